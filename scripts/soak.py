"""Soak: a federation that loses an executor every minute, for an hour, loses no query and leaks
nothing.

    python -m rentahal.scripts.soak --minutes 60 --kill-every 60 [--out RELIABILITY.md]

Three real node processes on loopback (scripts/federation.py): A routes only, B and C serve chat
(the smoke-test model). A client submits chat queries to A's websocket without pause (two at a
time, each with a distinct prompt). Every ``--kill-every`` seconds one executor, B or C in turn,
is killed with SIGKILL and started again on its data dir (same peer ID). Every 10 s A's RSS and
open file descriptors are sampled from /proc. At the end every query submitted is read back from
A's store: each must have exactly one result (status done) — a query with none is lost, and
``failovers`` say how many moved to the other executor.

Prints a markdown section (RSS and fd at the start, after a minute and at the end; queries
submitted, answered, lost, failed over; the kills); with ``--out`` it replaces that section of
the file. Run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from .benchreport import command_line, machine_info, write_section
from .federation import Federation, NodeProcess, connect

HEADING = "## Soak: an executor killed every minute"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(a: NodeProcess, execs: list[NodeProcess], minutes: float, kill_every: float) -> dict[str, Any]:
    submitted: list[str] = []
    outcomes: dict[str, str] = {}
    samples: list[tuple[float, float, int]] = []  # (seconds since start, RSS MB, fds)
    kills: list[str] = []
    start = time.monotonic()
    end = start + minutes * 60.0
    counter = itertools.count()
    guid = uuid.uuid4().hex  # one user: the queries are read back as theirs

    async def client(n: int) -> None:
        async with connect(a.ui, guid=guid) as c:
            while time.monotonic() < end:
                i = next(counter)
                qid = ""
                async for msg in c.stream(
                    "submit_query", realm="chat", stream=False, payload={"prompt": f"soak {n} {i}", "max_tokens": 32}
                ):
                    if msg["op"] == "event" and not qid:
                        qid = msg["event"].get("query_id", "")
                        submitted.append(qid)
                    elif msg["op"] in ("result", "error"):
                        outcomes[qid or f"unnamed-{i}"] = (
                            msg["op"] if msg["op"] == "result" else f"{msg['code']}: {msg['message'][:200]}"
                        )

    async def killer() -> None:
        for victim in itertools.cycle(execs):
            await trio.sleep(kill_every)
            if time.monotonic() >= end:
                return
            victim.kill()
            kills.append(f"{time.monotonic() - start:.0f}s {victim.name}")
            await trio.to_thread.run_sync(victim.start)

    async def sampler() -> None:
        while time.monotonic() < end:
            assert a.proc is not None
            samples.append((time.monotonic() - start, rss_mb(a.proc.pid), open_fds(a.proc.pid)))
            await trio.sleep(10.0)

    async with trio.open_nursery() as nursery:
        for n in range(2):
            nursery.start_soon(client, n)
        nursery.start_soon(killer)
        nursery.start_soon(sampler)
    assert a.proc is not None
    samples.append((time.monotonic() - start, rss_mb(a.proc.pid), open_fds(a.proc.pid)))
    # Read every query back from A's store: exactly one result each.
    async with connect(a.ui, guid=guid) as c:
        stored: dict[str, Any] = {}
        for qid in submitted:
            stored[qid] = await c.call("get_query", query_id=qid)
    lost = [q for q, got in stored.items() if got["result"] is None or got["query"]["status"] != "done"]
    doubled = [q for q, got in stored.items() if [e["status"] for e in got["events"]].count("done") > 1]
    failed_over = sum(1 for got in stored.values() if got["result"] and got["result"].get("failovers"))
    return {
        "submitted": len(submitted),
        "answered": sum(1 for v in outcomes.values() if v == "result"),
        "errors": sorted(v.split(":", 1)[0] for v in outcomes.values() if v != "result"),
        "error_messages": sorted(v for v in outcomes.values() if v != "result"),
        "lost": lost,
        "doubled": doubled,
        "failed_over": failed_over,
        "samples": samples,
        "kills": kills,
        "seconds": time.monotonic() - start,
    }


def report(r: dict[str, Any], minutes: float, kill_every: float) -> str:
    s = r["samples"]
    first_min = next((x for x in s if x[0] >= 60.0), s[-1])
    tail = [x[1] for x in s[len(s) // 2 :]]
    info = machine_info()
    return "\n".join(
        [
            HEADING,
            "",
            f"Command: `{command_line()}` ({minutes:g} min, an executor killed every {kill_every:g} s). "
            f"Machine: {info.get('cpu', '?')}; load average at the end {os.getloadavg()[0]:.2f}.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| queries submitted / answered / lost / answered twice | {r['submitted']} / {r['answered']} / "
            f"{len(r['lost'])} / {len(r['doubled'])} |",
            f"| answers that failed over to the other executor | {r['failed_over']} |",
            f"| errors returned to the client | {', '.join(r['errors']) or 'none'} |",
            f"| executors killed (SIGKILL) and restarted | {len(r['kills'])} |",
            f"| A's RSS: start / after 1 min / end / median of the second half | {s[0][1]:.1f} / {first_min[1]:.1f} / "
            f"{s[-1][1]:.1f} / {statistics.median(tail):.1f} MB |",
            f"| A's open files: start / after 1 min / end / max | {s[0][2]} / {first_min[2]} / {s[-1][2]} / "
            f"{max(x[2] for x in s)} |",
            f"| gossip: connections closed for want of a health record / peers blocked (all nodes' logs) | "
            f"{r.get('closed_silent', '?')} / {r.get('blocked', '?')} |",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        signal.signal(signal.SIGTERM, lambda *_: fed.close())
        try:
            router = fed.start("A", serve="none")
            execs = fed.start_many(["B", "C"], serve="chat", bootstrap=(router.addr,))
            for x in execs:
                router.wait_for(rf"peer {x.peer_id} is live", 60)
            r = trio.run(soak, router, execs, a.minutes, a.kill_every)
            lines = [line for node in (router, *execs) for line in node.lines]
            r["closed_silent"] = sum("no health record for" in line and "closing" in line for line in lines)
            r["blocked"] = sum("blocked peer" in line for line in lines)
        finally:
            fed.close()
        if r["lost"]:  # the nodes' logs (every run of each) go with the loss, for its post-mortem
            logs = Path(f"soak-logs-{time.strftime('%Y%m%d-%H%M%S')}")
            logs.mkdir()
            for node in (router, *execs):
                (logs / f"{node.name}.log").write_text("\n".join(node.lines) + "\n")
            print(f"node logs kept in {logs.resolve()}")
    text = report(r, a.minutes, a.kill_every)
    print(text)
    if r["lost"]:
        print("lost:", r["lost"][:20])
        for m in r["error_messages"][:20]:
            print("error:", m)
    if a.out:
        write_section(a.out, HEADING, text)


if __name__ == "__main__":
    main()
