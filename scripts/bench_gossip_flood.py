"""Benchmark: one peer floods a node with valid health records as fast as it can.

    python -m rentahal.scripts.bench_gossip_flood [--records 100000] [--out BENCHMARKS.md]

One real ``rentahal-node run`` process B on loopback (``serve="chat"``, the smoke-test model,
shipped defaults otherwise: ``p2p.gossip_per_second`` 100 with a burst of 200). The flooder is a
separate process (this script with ``--flooder``: a libp2p host built with the node's own p2p
code) that dials B and writes GossipSub RPCs straight onto a ``/meshsub/1.1.0`` stream, one
message per RPC, each message a health record that is valid in every way: signed by the
flooder (record and pubsub message), about the flooder, a fresh timestamp and a sequence number
above the last. It does not go through its own GossipSub router, which rate-limits and drops
what it publishes: an attacker runs whatever code it likes. The records are signed ahead of
time (``--records`` of them), so the flood is as fast as the connection takes them.

Measured, in the same run:

1. baseline: ``--queries`` honest chat queries (``max_tokens`` 16) through B's websocket, one
   after the other, from this process, before the flooder exists;
2. during the flood: the same queries, one after another (0.2 s apart), from the first record
   written until B is through with the flood: the flooder has written everything (it stays
   connected, so B still reads what it buffered) or was cut off, and B has used under 10 % of a
   core for a second;
3. B's CPU (utime + stime from /proc) over that same window (the honest queries included);
4. how many records B took (the flooder's own pubsub subscription is not involved: B's ``peers``
   report shows the flooder's record sequence it last took) and whether and when B blocked it
   (``peers``: state ``blocked``, the reason);
5. the same flood against a node started with the budget out of the way
   (``p2p.gossip_per_second`` 1000000): what processing every record costs B (skip it with
   ``--no-unbudgeted``).

Prints a markdown table (machine, command line, load from /proc/loadavg); with ``--out`` it
appends it to that file. Benchmarks are run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from rentahal.scripts.bench_throughput import proc_cpu_s
from rentahal.scripts.benchreport import command_line, machine_info
from rentahal.scripts.federation import Federation, NodeProcess, connect

MESHSUB = "/meshsub/1.1.0"
QUERY_PACE_S = 0.2  # honest users' pace through the flood window


# --- the flooder -------------------------------------------------------------------------------
def flood_frames(me: Any, public_key: bytes, n: int, *, first_seq: int | None = None) -> list[bytes]:
    """``n`` length-prefixed GossipSub RPCs, each carrying one valid, signed health record of
    ``me`` (an Identity) with increasing sequence numbers and the current time. ``public_key``:
    the libp2p-serialized public key (``fh.host.get_public_key().serialize()``)."""
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.pubsub import PUBSUB_SIGNING_PREFIX
    from libp2p.utils import encode_varint_prefixed

    from rentahal.p2p.health import HEALTH_TOPIC, HealthRecord, RealmStatus, sign_record

    from_id = ID.from_base58(me.peer_id).to_bytes()
    seq = first_seq if first_seq is not None else int(time.time() * 1000)
    prefix = PUBSUB_SIGNING_PREFIX.encode()
    out = []
    for i in range(n):
        record = HealthRecord(
            peer_id=me.peer_id,
            seq=seq + i,
            timestamp=time.time(),
            realms=(RealmStatus("chat", model="flood", queue_depth=0, slots=1),),
            version="flood",
        )
        msg = rpc_pb2.Message(
            data=sign_record(record, me), topicIDs=[HEALTH_TOPIC], from_id=from_id, seqno=(seq + i).to_bytes(8, "big")
        )
        msg.signature = me.sign(prefix + msg.SerializeToString())
        msg.key = public_key
        out.append(encode_varint_prefixed(rpc_pb2.RPC(publish=[msg]).SerializeToString()))
    return out


@dataclass
class FloodResult:
    written: int = 0
    seconds: float = 0.0
    ended: str = ""  # "all written", or how B cut the flooder off


async def flood(
    fh: Any, target: str, frames: list[bytes], *, on_start: Any = None, deadline: float = 600.0
) -> FloodResult:
    """Write ``frames`` onto a fresh pubsub stream to ``target`` as fast as it takes them, until
    all are written, the connection goes, or ``deadline`` seconds pass. Several RPCs go out per
    write (up to 64 KiB), as a sender in a hurry would batch them."""
    from libp2p.peer.id import ID

    stream = await fh.host.new_stream(ID.from_base58(target), [MESHSUB])
    res = FloodResult()
    started = time.monotonic()
    if on_start is not None:
        on_start()
    with trio.move_on_after(deadline):
        i = 0
        try:
            while i < len(frames):
                chunk, size = [], 0
                while i < len(frames) and size < 65536:
                    chunk.append(frames[i])
                    size += len(frames[i])
                    i += 1
                await stream.write(b"".join(chunk))
                res.written = i
                if not fh.is_connected(target):
                    res.ended = "disconnected by the node"
                    break
            else:
                res.ended = "all written"
        except Exception as exc:  # reset or closed under us: the node cut the flooder off
            res.ended = f"cut off: {type(exc).__name__}"
    res.ended = res.ended or f"deadline of {deadline:g}s"
    res.seconds = time.monotonic() - started
    return res


def _flooder_main(addr: str, n: int, deadline: float) -> None:
    """``--flooder``: print ``{"peer_id": ...}``, sign the records, print ``{"start": t}`` just
    before the first write, and ``{"written": ..., ...}`` at the end (JSON lines on stdout)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rentahal.p2p.host import open_federation_host
    from rentahal.p2p.identity import Identity

    async def main() -> None:
        me = Identity(Ed25519PrivateKey.generate())
        print(json.dumps({"peer_id": me.peer_id}), flush=True)
        async with open_federation_host(me, ["/ip4/127.0.0.1/tcp/0"]) as fh:
            frames = flood_frames(me, fh.host.get_public_key().serialize(), n)
            target = await fh.dial(addr, timeout=15)
            res = await flood(
                fh,
                target,
                frames,
                deadline=deadline,
                on_start=lambda: print(json.dumps({"start": time.time()}), flush=True),
            )
            print(
                json.dumps({"written": res.written, "seconds": res.seconds, "ended": res.ended, "end": time.time()}),
                flush=True,
            )
            # Stay connected until told to go (a line on stdin): B still reads what it buffered,
            # and a connection closed now would spare it that work.
            with trio.move_on_after(deadline):
                await trio.to_thread.run_sync(sys.stdin.readline)

    trio.run(main)


# --- the measurement -----------------------------------------------------------------------------
async def latencies(node: NodeProcess, n: int, *, until: Any = None) -> list[float]:
    """Seconds per honest query through the websocket, one after the other (``n`` of them, or
    as many as fit before ``until()`` is true, at least one)."""
    out: list[float] = []
    async with connect(node.ui) as client:
        while len(out) < n and not (out and until is not None and until()):
            started = time.monotonic()
            async for msg in client.stream(
                "submit_query", realm="chat", stream=False, payload={"prompt": f"honest {len(out)}", "max_tokens": 16}
            ):
                if msg["op"] == "error":
                    raise RuntimeError(f"honest query failed: {msg}")
            out.append(time.monotonic() - started)
    return out


async def paced_cpu_share(node: NodeProcess, seconds: float = 5.0) -> float:
    """The share of a core ``node`` uses while honest queries come at the pace they come at
    during the flood: what the flood window costs it without any flood."""
    assert node.proc is not None
    cpu0, t0 = proc_cpu_s(node.proc.pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        await latencies(node, 1)
        await trio.sleep(QUERY_PACE_S)
    return (proc_cpu_s(node.proc.pid) - cpu0) / (time.monotonic() - t0)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def run_one(records: int, queries: int, settings: dict[str, str], deadline: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        flooder: subprocess.Popen[str] | None = None
        try:
            b = fed.start("B", serve="chat", settings=settings)
            assert b.proc is not None
            trio.run(latencies, b, 3)  # warm-up: model and websocket paths
            baseline = trio.run(latencies, b, queries)
            paced_share = trio.run(paced_cpu_share, b)
            flooder = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rentahal.scripts.bench_gossip_flood",
                    "--flooder",
                    b.addr,
                    "--records",
                    str(records),
                    "--deadline",
                    str(deadline),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert flooder.stdout is not None and flooder.stdin is not None
            said: list[dict[str, Any]] = []

            def read_flooder() -> None:
                for line in flooder.stdout:  # type: ignore[union-attr]
                    said.append(json.loads(line))

            threading.Thread(target=read_flooder, daemon=True).start()
            t_wait = time.monotonic()
            while not any("start" in x for x in said):
                if flooder.poll() is not None or time.monotonic() - t_wait > 120:
                    raise RuntimeError(f"the flooder did not start: {said}")
                time.sleep(0.05)  # polling the flooder's output
            attacker = said[0]["peer_id"]
            cpu0, t0 = proc_cpu_s(b.proc.pid), time.monotonic()
            recent = [(t0, cpu0)]

            def settled() -> bool:
                """The flooder has written everything (or was cut off) and B has used no more
                than the honest queries alone cost it (``paced_share``, +5 % of a core) for the
                last second: B is through with the flood."""
                now, cpu = time.monotonic(), proc_cpu_s(b.proc.pid)
                recent.append((now, cpu))
                while len(recent) > 2 and now - recent[1][0] >= 1.0:
                    recent.pop(0)
                t_a, c_a = recent[0]
                ended = any("written" in x for x in said)
                return ended and now - t_a >= 1.0 and (cpu - c_a) / (now - t_a) < paced_share + 0.05

            async def during_flood() -> list[float]:
                out: list[float] = []
                while not settled() and time.monotonic() - t0 < deadline + 60:
                    out += await latencies(b, 1)
                    await trio.sleep(QUERY_PACE_S)
                return out

            during = trio.run(during_flood)
            # B idle for the last second of the window: that second is not flood work.
            cpu1, t1 = proc_cpu_s(b.proc.pid), time.monotonic()
            done = next(x for x in said if "written" in x)
            flooder.stdin.write("go\n")
            flooder.stdin.flush()
            flooder.wait(30)
            start = said[1]
            peer = b.peer(attacker) or {}
            blocked_at = None
            for line in b.lines:
                if f"blocked peer {attacker}" in line:
                    blocked_at = line
                    break
            return {
                "settings": settings,
                "baseline": baseline,
                "during": during,
                "written": done["written"],
                "flood_s": done["seconds"],
                "ended": done["ended"],
                "cpu_s": cpu1 - cpu0,
                "cpu_wall_s": t1 - t0,
                "paced_share": paced_share,
                "state": peer.get("state"),
                "blocked": peer.get("blocked"),
                "violations": peer.get("violations"),
                "start": start["start"],
                "blocked_line": blocked_at,
                "taken": taken_records(b, attacker),
            }
        finally:
            if flooder is not None and flooder.poll() is None:
                flooder.kill()
                flooder.wait()
            fed.close()


def taken_records(node: NodeProcess, attacker: str) -> int | None:
    """Records of the attacker B took, if B's reports expose a count: they do not (yet)."""
    status = node.cli_json("status")
    for key in ("gossip_dropped", "gossip"):
        if key in status:
            return status[key]
    return None


def report(runs: dict[str, dict[str, Any]], command: str) -> str:
    info = machine_info()
    load = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        "## Gossip flood: one peer's valid records as fast as it can write them",
        "",
        f"Command: `{command}`; machine: {info['nproc']} × {info['cpu']}, Python {info['python']}, "
        f"libp2p {info['libp2p']}, commit {info['commit']}; load average when it ended: {' '.join(load)}.",
        "",
        "| node | records written | flood lasted | flooder's end | B's CPU over the flood | "
        "the flood's own (honest queries' share taken out) | "
        "CPU per record written | honest p50 / p95 / max before | honest p50 / p95 / max during (n) | "
        "flooder in B's peers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        b, d = r["baseline"], r["during"]
        state = r["state"] or "not listed"
        if r["blocked"]:
            state += f" ({r['blocked']})"
        own = max(0.0, r["cpu_s"] - r["paced_share"] * r["cpu_wall_s"])
        lines.append(
            f"| {name} | {r['written']:,} | {r['flood_s']:.1f} s | {r['ended']} | "
            f"{r['cpu_s']:.1f} s in {r['cpu_wall_s']:.1f} s ({100 * r['cpu_s'] / max(r['cpu_wall_s'], 1e-9):.0f} % "
            f"of a core) | {own:.1f} s | "
            f"{1e6 * own / max(r['written'], 1):.0f} µs | "
            f"{1000 * statistics.median(b):.0f} / {1000 * pct(b, 95):.0f} / {1000 * max(b):.0f} ms | "
            f"{1000 * statistics.median(d):.0f} / {1000 * pct(d, 95):.0f} / {1000 * max(d):.0f} ms ({len(d)}) | "
            f"{state}; violations {r['violations']} |"
        )
    lines.append("")
    for name, r in runs.items():
        if r["blocked_line"]:
            lines.append(f"- {name}: blocked after {r['blocked_line']!r} (flood began at {r['start']:.1f} unix).")
        if r["taken"] is None:
            lines.append(f"- {name}: B's reports expose no count of gossip messages dropped or taken.")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=120.0, help="longest flood, seconds")
    ap.add_argument("--no-unbudgeted", action="store_true", help="skip the run without a budget")
    ap.add_argument("--out", help="append the result to this markdown file")
    ap.add_argument("--flooder", metavar="ADDR", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.flooder:
        _flooder_main(a.flooder, a.records, a.deadline)
        return
    runs = {"budget (defaults)": run_one(a.records, a.queries, {}, a.deadline)}
    if not a.no_unbudgeted:
        runs["no budget (gossip_per_second 1e6)"] = run_one(
            a.records, a.queries, {"p2p.gossip_per_second": "1000000"}, a.deadline
        )
    text = report(runs, command_line())
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
