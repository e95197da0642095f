"""Benchmark: real `rentahal-node run` processes on the multi-host testbed (network namespaces,
home NAT routers), all in one run: how long a home node takes to become reachable behind a NAT,
what a chat query costs on each network path, and what relaying costs the relay.

    python -m rentahal.scripts.bench_netns [--n 100] [--batch 10] [--warmup 10] [--runs 3]
                                           [--streams 4] [--idle-s 10] [--busy-s 15]
                                           [--out BENCHMARKS.md]
    python scripts/bench_netns.py ...

Needs root, iproute2 and nftables (``scripts/testbed.py``); only addresses inside the namespaces
built here are used, and every node and namespace is removed at the end (also on Ctrl-C or
SIGTERM). Every node has ``p2p.mdns=false``, so only the bootstrap addresses given here shape
the federations; executors run with ``limits.peer_queries_per_minute=0``. The hosts:

- LAN (one bridge, no NAT): d1 (serves chat), d2 (bootstrap d1);
- public net "wan": relays P and P2 (``p2p.relay_service=on``: relays from their start, as
  long-running public nodes are; P2's circuit limits raised to ``p2p.relay_duration=900``,
  ``p2p.relay_bytes=1 GiB`` so no circuit is cut mid-run), and behind home routers on it:
  c1 (serves chat), c2 behind cone NATs, bootstrap P; s1 (serves chat), s2 behind SYMMETRIC
  NATs (``masquerade random``: hole punching cannot work), bootstrap P2.

Measured:

1. **Start to reachable** (``--runs`` times, one after another, while P, P2 and d1 idle): each
   run a fresh home (cone NAT) and a fresh node (serves nothing, bootstrap P), timed from just
   before its process is launched to the arrival of its log lines ``ready`` (network up,
   websocket served), ``reachability: private`` (P could not dial it back) and
   ``relay: reserved a slot`` (reachable via P's relay); then it is stopped.
2. **Query latency by path**, chat with ``max_tokens`` 1 on the smoke-test model, one query in
   flight, submit -> ``result`` on the origin node's websocket. The websocket listens on
   127.0.0.1 inside the node's namespace, so each client is this script run inside that
   namespace (``ip netns exec <ns> ... --client URL``), speaking ``scripts.federation.connect``
   and printing JSON. Baselines: ``bench_routing``'s raw py-libp2p echo (a new stream per
   request, as the query protocol does; both processes in d1's namespace, on its loopback) and
   d1 queried on its own websocket (executor ``local``). Paths: (a) direct d2 -> d1; (c)
   hole-punched c2 -> c1, once c2's ``route chat`` shows c1 first with note ``direct`` (DCUtR
   made a direct connection beside the relayed one); (b) relayed s2 -> P2 -> s1, note
   ``via relay`` before and after. All four clients warm up, then take turns, ``--batch``
   queries at a time, so that whatever else the machine does falls on every path alike; P's and
   P2's CPU is read around each batch.
3. **Relay CPU** (the other nodes stopped): P2's CPU time (utime + stime of its process,
   ``/proc/<pid>/stat``) over ``--idle-s`` seconds with s1 and s2 connected through it and no
   queries, then over ``--busy-s`` seconds while ``--streams`` query loops run concurrently on
   s2's websocket (each query a new stream s2 -> s1 over the one relayed connection).

Prints a markdown section; with ``--out`` it replaces that section of the file (from its heading
to the next ``## `` heading or the end), leaving every other section as it was. Benchmarks are
run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rentahal.scripts import testbed as tb
from rentahal.scripts.benchreport import (
    command_line,
    machine_info,
    other_cpu_share,
    run_cmd,
    write_section,
)
from rentahal.scripts.benchreport import cpu_times as _cpu_times
from rentahal.scripts.federation import Federation, NodeProcess

SECTION_HEADING = "## Behind NAT: time to reachable, query latency by path, relay CPU"
SCRIPT = str(Path(__file__).resolve())
REQUEST_TIMEOUT = 30.0
LIVE_TIMEOUT = 90.0  # a node's log line we wait for (reachability, reservation, peer live)
ROUTE_WAIT = 90.0  # the client waits this long at most for the route it is told to expect
BASE = {"p2p.mdns": "false"}
EXECUTOR = {**BASE, "limits.peer_queries_per_minute": "0"}
RELAY = {**BASE, "p2p.relay_service": "on"}

_on_exit: list[Callable[[], None]] = []


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


def stop_all() -> None:
    """Stop every client, node, namespace and temporary directory this run made."""
    while _on_exit:
        with contextlib.suppress(Exception):
            _on_exit.pop()()


def progress(msg: str) -> None:
    print(f"[bench_netns] {msg}", file=sys.stderr, flush=True)


def chat_payload(tokens: int) -> dict[str, Any]:
    return {
        "prompt": "hello",
        "max_tokens": tokens,
        "seed": 1,
        "temperature": 0,
        "ignore_eos": True,
    }


def quantile(samples: Sequence[float], p: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[p - 1]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the client, run inside a node's namespace ----------------------------------------------


async def _client(args: argparse.Namespace) -> None:
    """Connect, wait for the expected route, warm up; then run queries in batches: one batch of
    ``--n`` (``--concurrency`` loops, at most ``--duration`` s) printed between ``GO`` and ``END``,
    or with ``--turns`` one batch per number read from stdin (an empty line or EOF ends), each
    batch one JSON line; the last JSON line has the route before and after."""
    import trio

    from rentahal.scripts.federation import NodeError, connect

    payload = chat_payload(args.tokens)
    final: dict[str, Any] = {}
    async with connect(args.client, guid=uuid.uuid4().hex) as c:

        async def route() -> dict[str, Any]:
            with trio.fail_after(REQUEST_TIMEOUT):
                return (await c.call("route", realm="chat"))["route"]

        def first(plan: dict[str, Any]) -> dict[str, Any]:
            return plan["candidates"][0] if plan["candidates"] else {}

        if args.want_executor:
            t0 = time.monotonic()
            while True:
                plan = await route()
                top = first(plan)
                if top.get("executor") == args.want_executor and top.get("note") == args.want_note:
                    break
                if time.monotonic() - t0 > ROUTE_WAIT:
                    raise BenchError(
                        f"no route to {args.want_executor} ({args.want_note}) within {ROUTE_WAIT:g}s; last plan: {plan}"
                    )
                await trio.sleep(0.25)
            final["route_wait_s"] = time.monotonic() - t0
            final["route_before"] = top
            print("ROUTE", flush=True)

        async def one() -> tuple[float, dict[str, Any]]:
            t0 = time.perf_counter()
            with trio.fail_after(REQUEST_TIMEOUT):
                async for msg in c.stream("submit_query", realm="chat", payload=payload):
                    if msg["op"] == "result":
                        return time.perf_counter() - t0, msg["result"]
                    if msg["op"] == "error":
                        raise NodeError(msg["code"], msg["message"])
            raise BenchError("the query stream ended without a result")

        async def batch(n: int, concurrency: int, duration: float) -> dict[str, Any]:
            out: dict[str, Any] = {
                "samples_ms": [],
                "executors": Counter(),
                "failovers": 0,
                "errors": [],
            }
            count = 0
            deadline = time.monotonic() + duration

            async def loop() -> None:
                nonlocal count
                while count < n and time.monotonic() < deadline:
                    count += 1
                    try:
                        dt, res = await one()
                    except NodeError as exc:
                        out["errors"].append(str(exc))
                        if len(out["errors"]) > max(5, n // 10):
                            raise
                        continue
                    out["samples_ms"].append(dt * 1000.0)
                    out["executors"][res["executor"]] += 1
                    out["failovers"] += bool(res.get("failovers"))

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(loop)
            out["wall_s"] = time.perf_counter() - t0
            return out

        for _ in range(args.warmup):
            await one()
        print("READY", flush=True)
        if args.turns:
            while (line := await trio.to_thread.run_sync(sys.stdin.readline)).strip():
                print(json.dumps(await batch(int(line), 1, args.duration)), flush=True)
        else:
            print("GO", flush=True)
            final |= await batch(args.n, args.concurrency, args.duration)
            print("END", flush=True)
        if args.want_executor:
            final["route_after"] = first(await route())
    print(json.dumps(final), flush=True)


def client_main(args: argparse.Namespace) -> int:
    import trio

    trio.run(_client, args)
    return 0


def echo_client_main(args: argparse.Namespace) -> int:
    """bench_routing's baseline A (echo server child + client), here in the caller's namespace."""
    import trio

    from rentahal.scripts.bench_routing import EchoChild, measure_libp2p

    with tempfile.TemporaryDirectory(prefix="bench_netns-echo-") as tmp:
        echo = EchoChild(Path(tmp))
        try:
            addr = echo.wait_addr()
            one, per_request = trio.run(measure_libp2p, addr, args.n, args.warmup)
        finally:
            echo.kill()
    print(
        json.dumps(
            {
                "one_stream_ms": [s * 1000 for s in one.samples_s],
                "samples_ms": [s * 1000 for s in per_request.samples_s],
                "wall_s": per_request.wall_s,
            }
        ),
        flush=True,
    )
    return 0


class Client:
    """This script as a client inside ``host``'s namespace; its stdout lines are time-stamped."""

    def __init__(self, host: tb.Host, *args: str) -> None:
        self.host = host
        self.proc = host.popen(
            [sys.executable, SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _on_exit.append(self.kill)
        self._lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self._err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put((time.monotonic(), line.rstrip("\n")))
        self._lines.put((time.monotonic(), "<exited>"))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line.rstrip("\n"))

    def line(self, timeout: float) -> tuple[float, str]:
        try:
            stamp, line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise BenchError(
                f"client in {self.host.name}: no output within {timeout:g}s:\n" + "\n".join(self._err[-20:])
            ) from None
        if line == "<exited>":
            raise BenchError(f"client in {self.host.name} exited ({self.proc.wait()}):\n" + "\n".join(self._err[-20:]))
        return stamp, line

    def expect(self, marker: str, timeout: float) -> float:
        """When the line ``marker`` arrived (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            stamp, line = self.line(max(0.1, deadline - time.monotonic()))
            if line == marker:
                return stamp

    def json_line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, line = self.line(max(0.1, deadline - time.monotonic()))
            if line.startswith("{"):
                return json.loads(line)

    def result(self, timeout: float) -> dict[str, Any]:
        """The last JSON line, once the client has exited."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # a client taking turns ends at EOF
        out = self.json_line(timeout)
        self.proc.wait(10)
        return out

    def batch(self, n: int, timeout: float) -> dict[str, Any]:
        """A client taking turns: ``n`` queries, one in flight."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self.json_line(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def turn_taker(host: tb.Host, url: str, a: argparse.Namespace, *, executor: str = "", note: str = "") -> Client:
    """A client that warms up, then runs a batch each time it is asked (``Client.batch``)."""
    args = ["--client", url, "--turns", "--warmup", str(a.warmup), "--tokens", str(a.tokens)]
    if executor:
        args += ["--want-executor", executor, "--want-note", note]
    return Client(host, *args)


# --- nodes ----------------------------------------------------------------------------------


class TimedNode(NodeProcess):
    """A node whose log lines carry the time they arrived, and whose launch time is known."""

    launched = 0.0
    stamps: list[float]

    def launch(self) -> NodeProcess:
        self.stamps = []
        self.launched = time.monotonic()
        return super().launch()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self.stamps.append(time.monotonic())
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exited>")
            self.stamps.append(time.monotonic())
            self._cond.notify_all()

    def stamp_of(self, pattern: str, timeout: float) -> float:
        """When (monotonic) the first log line matching ``pattern`` arrived."""
        self.wait_for(pattern, timeout)
        rx = re.compile(pattern)
        with self._cond:
            return self.stamps[next(i for i, line in enumerate(self.lines) if rx.search(line))]

    def seconds_to(self, pattern: str, timeout: float) -> float:
        """Seconds from launch to the first log line matching ``pattern``."""
        return self.stamp_of(pattern, timeout) - self.launched


def start(fed: Federation, host: tb.Host, name: str, **kw: Any) -> TimedNode:
    """A node on ``host`` on its default listen address (0.0.0.0, port 4001)."""
    node = TimedNode(fed.root / name, name=name, netns=host.ns, listen=None, **kw)
    fed.nodes.append(node)
    node.launch()
    return node


def live(node: TimedNode, peer: NodeProcess) -> float:
    """When ``node`` logged ``peer`` live (monotonic)."""
    return node.stamp_of(rf"peer {re.escape(peer.peer_id)} is live \(serves: chat\)", LIVE_TIMEOUT)


# --- the run --------------------------------------------------------------------------------


@dataclass
class Results:
    args: argparse.Namespace
    started: _dt.datetime
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    competing_start: str = ""
    competing_end: str = ""
    others_cpu: str = ""
    elapsed_s: float = 0.0
    startup: list[dict[str, float]] = field(default_factory=list)
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)  # path -> executor peer id
    holepunch_wait_s: float = 0.0
    relay: dict[str, Any] = field(default_factory=dict)


def competing() -> str:
    """Other test runs or nodes on the machine (they skew every figure)."""
    found = []
    for pattern in ("pytest", "rentahal-node run"):
        out = run_cmd("pgrep", "-f", pattern).split()
        pids = [p for p in out if p.isdigit() and int(p) != os.getpid()]
        if pids:
            found.append(f"{len(pids)} `{pattern}` process(es)")
    other_ns = [ns for ns in run_cmd("ip", "netns", "list").splitlines() if ns.strip()]
    if other_ns:
        found.append(f"{len(other_ns)} network namespace(s)")
    return ", ".join(found) or "none"


PATHS = ("local", "direct", "holepunched", "relayed")


def phase_startup(bed: tb.Testbed, fed: Federation, r: Results, wan: tb.Network, p: TimedNode) -> None:
    for i in range(1, r.args.runs + 1):
        _, h = bed.home(f"u{i}", wan)
        node = start(fed, h, f"U{i}", serve="none", bootstrap=(p.addr,), settings=BASE)
        row = {
            "ready": node.seconds_to(r"ready peer=", 60),
            "private": node.seconds_to(r"reachability: private", LIVE_TIMEOUT),
            "reserved": node.seconds_to(rf"relay: reserved a slot on {re.escape(p.peer_id)}", LIVE_TIMEOUT),
        }
        r.startup.append(row)
        took = ", ".join(f"{k} {v:.2f} s" for k, v in row.items())
        progress(f"start to reachable, run {i}: {took}")
        node.stop()


def take_turns(r: Results, clients: dict[str, Client], relays: dict[str, int]) -> None:
    """Up to ``--n`` queries per path, ``--batch`` at a time, the paths taking turns (the first
    path rotating), so that whatever else the machine does falls on every path alike. The
    relays' CPU is read around each batch."""
    a = r.args
    for key in PATHS:
        r.paths[key] = {
            "samples_ms": [],
            "executors": Counter(),
            "failovers": 0,
            "errors": [],
            "wall_s": 0.0,
            "relay_cpu_s": dict.fromkeys(relays, 0.0),
        }
    done, turn = 0, 0
    while done < a.n:
        k = min(a.batch, a.n - done)
        for key in PATHS[turn % 4 :] + PATHS[: turn % 4]:
            before = {name: process_cpu_s(pid) for name, pid in relays.items()}
            res = clients[key].batch(k, k * REQUEST_TIMEOUT + 30)
            acc = r.paths[key]
            for name, pid in relays.items():
                acc["relay_cpu_s"][name] += process_cpu_s(pid) - before[name]
            acc["samples_ms"] += res["samples_ms"]
            acc["executors"].update(res["executors"])
            acc["failovers"] += res["failovers"]
            acc["errors"] += res["errors"]
            acc["wall_s"] += res["wall_s"]
        done += k
        turn += 1
    for key in PATHS:
        r.paths[key] |= clients[key].result(60)


def relay_cpu(r: Results, h2: tb.Host, s2: TimedNode, s1: TimedNode, p2: TimedNode) -> None:
    """P2's CPU idle (s1 and s2 connected through it), then under ``--streams`` query loops."""
    a = r.args
    procs = {"P2": p2.proc, "s1": s1.proc, "s2": s2.proc}
    pids = {k: proc.pid for k, proc in procs.items() if proc is not None}

    def cpu() -> dict[str, float]:
        return {k: process_cpu_s(pid) for k, pid in pids.items()}

    progress(f"relay CPU: P2 idle for {a.idle_s:g} s")
    t0, c0 = time.monotonic(), cpu()
    time.sleep(a.idle_s)
    t1, c1 = time.monotonic(), cpu()
    idle = {"wall_s": t1 - t0, **{k: c1[k] - c0[k] for k in pids}}
    progress(f"relay CPU: {a.streams} concurrent query loops s2 -> s1 for {a.busy_s:g} s")
    client = Client(
        h2,
        "--client",
        s2.ui,
        "--n",
        "1000000",
        "--warmup",
        str(a.streams),
        "--tokens",
        str(a.tokens),
        "--concurrency",
        str(a.streams),
        "--duration",
        str(a.busy_s),
        "--want-executor",
        s1.peer_id,
        "--want-note",
        "via relay",
    )
    go = client.expect("GO", ROUTE_WAIT + a.streams * REQUEST_TIMEOUT + 30)
    c_go = cpu()
    end = client.expect("END", a.busy_s + REQUEST_TIMEOUT + 30)
    c_end = cpu()
    busy_q = client.result(60)
    busy = {"wall_s": end - go, **{k: c_end[k] - c_go[k] for k in pids}}
    r.relay = {"idle": idle, "busy": busy, "queries": busy_q}


def run_phases(bed: tb.Testbed, fed: Federation, r: Results) -> None:
    a = r.args
    lan = bed.network("lan", "10.10.0.0/24")
    wan = bed.network("wan", "10.20.0.0/24")
    hd1, hd2 = bed.host("d1", lan), bed.host("d2", lan)
    hp, hp2 = bed.host("pub", wan), bed.host("pub2", wan)
    progress("public relays P and P2 (p2p.relay_service=on), LAN node d1 (serves chat)")
    p = start(fed, hp, "P", serve="none", settings=RELAY)
    p2 = start(
        fed, hp2, "P2", serve="none", settings={**RELAY, "p2p.relay_duration": "900", "p2p.relay_bytes": str(1 << 30)}
    )
    d1 = start(fed, hd1, "D1", serve="chat", settings=EXECUTOR)
    for n in (p, p2, d1):
        n.wait_ready()
    for n in (p, p2):
        n.wait_for(r"relay: serving as a circuit relay", 30)
    for n in (p, p2):  # the CPU read is the node's own process (`ip netns exec` execs it)
        assert n.proc is not None
        cmd = Path(f"/proc/{n.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "rentahal-node" not in cmd:
            raise BenchError(f"{n.name}'s pid {n.proc.pid} is not the node process: {cmd}")

    progress(f"start to reachable behind a cone NAT, {a.runs} runs")
    phase_startup(bed, fed, r, wan, p)
    progress("baseline: raw py-libp2p echo, new stream per request (inside d1's namespace)")
    echo = Client(hd1, "--echo-client", "--n", str(a.n), "--warmup", str(a.warmup))
    r.paths["raw"] = echo.result(120)

    progress(
        "d2 (bootstrap d1); cone NATs: c1 (serves chat), c2 (bootstrap P); "
        "symmetric NATs: s1 (serves chat), s2 (bootstrap P2)"
    )
    _, hc1 = bed.home("c1", wan)
    _, hc2 = bed.home("c2", wan)
    _, hs1 = bed.home("s1", wan, symmetric=True)
    _, hs2 = bed.home("s2", wan, symmetric=True)
    d2 = start(fed, hd2, "D2", serve="none", bootstrap=(d1.addr,), settings=BASE)
    c1 = start(fed, hc1, "C1", serve="chat", bootstrap=(p.addr,), settings=EXECUTOR)
    c2 = start(fed, hc2, "C2", serve="none", bootstrap=(p.addr,), settings=BASE)
    s1 = start(fed, hs1, "S1", serve="chat", bootstrap=(p2.addr,), settings=EXECUTOR)
    s2 = start(fed, hs2, "S2", serve="none", bootstrap=(p2.addr,), settings=BASE)
    for n in (d2, c1, c2, s1, s2):
        n.wait_ready()
    c1_seen = live(c2, c1)
    progress(
        "clients: hole-punched (c2 -> c1, once route says direct), local (d1), "
        "direct (d2 -> d1), relayed (s2 -> P2 -> s1); warm-up"
    )
    clients = {"holepunched": turn_taker(hc2, c2.ui, a, executor=c1.peer_id, note="direct")}
    live(d2, d1)
    live(s2, s1)
    clients |= {
        "local": turn_taker(hd1, d1.ui, a),
        "direct": turn_taker(hd2, d2.ui, a, executor=d1.peer_id, note="direct"),
        "relayed": turn_taker(hs2, s2.ui, a, executor=s1.peer_id, note="via relay"),
    }
    r.expected = {
        "local": "local",
        "direct": d1.peer_id,
        "holepunched": c1.peer_id,
        "relayed": s1.peer_id,
        "busy": s1.peer_id,
    }
    r.holepunch_wait_s = clients["holepunched"].expect("ROUTE", ROUTE_WAIT + 30) - c1_seen
    for c in clients.values():
        c.expect("READY", ROUTE_WAIT + a.warmup * REQUEST_TIMEOUT + 30)
    progress(f"timed queries: {a.n} per path, {a.batch} at a time, the paths taking turns")
    assert p.proc is not None and p2.proc is not None
    take_turns(r, clients, {"P": p.proc.pid, "P2": p2.proc.pid})
    for key in PATHS:
        t = r.paths[key]
        progress(f"{key}: p50 {statistics.median(t['samples_ms']):.2f} ms, p95 {quantile(t['samples_ms'], 95):.2f} ms")

    for n in (d2, d1, c2, c1, p):  # only the relayed pair and its relay from here on
        n.stop()
    relay_cpu(r, hs2, s2, s1, p2)


def run_benchmark(args: argparse.Namespace) -> Results:
    r = Results(args=args, started=_dt.datetime.now(_dt.UTC), load_start=os.getloadavg())
    r.competing_start = competing()
    progress(f"load average {r.load_start}; others on the machine: {r.competing_start}")
    cpu_start = (_cpu_times(), os.times())
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_netns-")
    bed = tb.Testbed()
    fed = Federation(Path(tmp))
    _on_exit.extend([lambda: shutil.rmtree(tmp, ignore_errors=True), bed.close, fed.close])
    try:
        run_phases(bed, fed, r)
    finally:
        fed.close()
        bed.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for path, executor in r.expected.items():
        got = (r.relay["queries"] if path == "busy" else r.paths[path])["executors"]
        if set(got) != {executor}:
            raise BenchError(f"{path}: answered by {dict(got)}, expected only {executor}")
    r.elapsed_s = time.perf_counter() - t_start
    r.others_cpu = other_cpu_share(cpu_start, r.elapsed_s)
    r.load_end = os.getloadavg()
    r.competing_end = competing()
    progress(f"done in {r.elapsed_s:.0f} s; load average {r.load_end}; others: {r.competing_end}")
    return r


# --- report ---------------------------------------------------------------------------------

PATH_ROWS = (
    ("raw", "baseline: raw py-libp2p echo, new stream per request (loopback, in d1's namespace)"),
    ("local", "baseline: local query, d1's websocket → d1 → llama.cpp"),
    ("direct", "(a) direct: d2 → d1, one LAN"),
    ("holepunched", "(c) hole-punched: c2 → c1, cone NATs, after DCUtR"),
    ("relayed", "(b) relayed: s2 → P2 → s1, symmetric NATs"),
)


def _load(x: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in x)


def render(r: Results, info: dict[str, str]) -> str:
    a = r.args
    lines = [
        SECTION_HEADING,
        "",
        "```sh",
        command_line(),
        "```",
        "",
        f"Run {r.started.strftime('%Y-%m-%d %H:%M UTC')}, commit `{info['commit']}`: "
        f"`nproc` {info['nproc']} ({info['cpu']}), Python {info['python']}, "
        f"py-libp2p {info['libp2p']}, llama-cpp-python {info['llama']}. "
        f"Load average {_load(r.load_start)} at the start, {_load(r.load_end)} at the end; "
        f"the run took {r.elapsed_s:.0f} s, during which other processes used {r.others_cpu} "
        f"of the CPUs; other test runs, nodes or namespaces on the machine: "
        f"{r.competing_start} at the start, {r.competing_end} at the end. Every host is a "
        f"network namespace of `scripts/testbed.py` (veth links to bridges, no added delay: the "
        f"figures are the software's cost, not a real network's), every node a "
        f"`rentahal-node run` on its default listen address, `p2p.mdns=false`.",
        "",
        "### Start to reachable behind a cone NAT",
        "",
        f"A fresh home node (serves nothing, bootstrap P; P is a relay from its start, "
        f"`p2p.relay_service=on`), seconds from just before its process launch to each log line; "
        f"{len(r.startup)} runs one after another, each in a fresh home with a fresh data dir, "
        f"while P, P2 and d1 idle.",
        "",
        "| run | `ready` (process up, network and websocket served) | `reachability: private` "
        "| `relay: reserved a slot` (reachable via relay) |",
        "| --- | ---: | ---: | ---: |",
    ]
    keys = ("ready", "private", "reserved")
    for i, row in enumerate(r.startup, 1):
        lines.append(f"| {i} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    med = {k: statistics.median(row[k] for row in r.startup) for k in keys}
    from rentahal.p2p.reachability import DIAL_BACK_TIMEOUT, TICK
    from rentahal.p2p.relay import CHECK_INTERVAL

    to_private = statistics.median(row["private"] - row["ready"] for row in r.startup)
    to_reserved = statistics.median(row["reserved"] - row["private"] for row in r.startup)
    lines += [
        "| **median** | " + " | ".join(f"**{med[k]:.2f}**" for k in keys) + " |",
        "",
        f"Where the time goes (medians): `ready` → `private` {to_private:.2f} s: the "
        f"bootstrap connection to P, then (ticks of {TICK:g} s) the dial-back request, and P's "
        f'dial to the home\'s public address is dropped by the NAT, so the answer "no" comes '
        f"only when that dial times out (`DIAL_BACK_TIMEOUT` = {DIAL_BACK_TIMEOUT:g} s, most "
        f"of this step); `private` → "
        f"`reserved` {to_reserved:.2f} s: the relay service looks for relays every "
        f"{CHECK_INTERVAL:g} s, then one reservation round trip.",
        "",
        "### Chat query latency by network path",
        "",
        f"Payload `{json.dumps(chat_payload(a.tokens))}` on the smoke-test model, timed from "
        f"submit to `result` on the origin node's websocket by a client inside that node's "
        f"namespace, one query in flight. All four node pairs are up at once; after "
        f"{a.warmup} warm-up queries per client, the paths take turns, {a.batch} queries at a "
        f"time, {a.n} per path. Route note: the executor's note in the origin node's "
        f"`route chat` before and after the timed queries. Relay CPU: the CPU time of P (the "
        f"cone homes' relay) and of P2 (the symmetric homes' relay) during that path's batches, "
        f"per query.",
        "",
        "| path | route note | n | p50 ms | p95 ms | p99 ms | mean ms | p50 − local ms | P / P2 CPU ms per query |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    local_p50 = statistics.median(r.paths["local"]["samples_ms"])
    for key, label in PATH_ROWS:
        res = r.paths[key]
        s = res["samples_ms"]
        note = f"{res['route_before']['note']} / {res['route_after']['note']}" if "route_before" in res else ""
        diff = "" if key in ("raw", "local") else f"{statistics.median(s) - local_p50:+.2f}"
        cpu = res.get("relay_cpu_s")
        relay = f"{1000 * cpu['P'] / len(s):.2f} / {1000 * cpu['P2'] / len(s):.2f}" if cpu else ""
        lines.append(
            f"| {label} | {note} | {len(s)} | {statistics.median(s):.2f} | {quantile(s, 95):.2f} "
            f"| {quantile(s, 99):.2f} | {statistics.fmean(s):.2f} | {diff} | {relay} |"
        )
    errs = {k: len(r.paths[k].get("errors", [])) for k, _ in PATH_ROWS if k != "raw"}
    fails = {k: r.paths[k].get("failovers", 0) for k, _ in PATH_ROWS if k != "raw"}
    hp = r.paths["holepunched"]
    idle_p2 = r.relay["idle"]["P2"] / r.relay["idle"]["wall_s"]
    lines += [
        "",
        f"Every timed query was answered by the expected executor (d1 itself as `local`, d1, "
        f"c1, s1); errors: {errs}; queries that needed a failover: {fails}. Hole punching: "
        f"c2's route to c1 was `direct` at most {r.holepunch_wait_s:.1f} s after c2 logged c1 "
        f"live (when the client on c2, started after that line, found it so, polling `route` "
        f"every 0.25 s for {hp['route_wait_s']:.1f} s); s1 stayed `via relay` before and after "
        f"(symmetric NATs). The relay CPU column shows where the bytes went: P2 "
        f"works while s2 → s1 queries run, and P, through which c1 and c2 met, no more "
        f"during the hole-punched queries than during the others (10 ms clock ticks; each "
        f"relay's idle work, about {1000 * idle_p2:.0f} ms/s, is in every batch, most in the "
        f"slowest).",
        "",
    ]
    idle, busy, q = r.relay["idle"], r.relay["busy"], r.relay["queries"]
    nq = len(q["samples_ms"])
    rate_idle = idle["P2"] / idle["wall_s"]
    rate_busy = busy["P2"] / busy["wall_s"]
    extra = busy["P2"] - rate_idle * busy["wall_s"]
    lines += [
        "### Relay CPU per relayed stream",
        "",
        f"P2's process CPU (utime + stime from `/proc/<pid>/stat`, 10 ms ticks), idle (s1 and s2 "
        f"connected through it, no queries) for {idle['wall_s']:.1f} s, then while {a.streams} "
        f"query loops ran concurrently on s2's websocket (each query a new stream s2 → s1 over "
        f"the one relayed connection) for {busy['wall_s']:.1f} s: {nq} queries, "
        f"{nq / busy['wall_s']:.0f} queries/s, latency p50 "
        f"{statistics.median(q['samples_ms']):.2f} ms, p95 {quantile(q['samples_ms'], 95):.2f} ms "
        f"(s1 has one chat slot, so the loops also queue there).",
        "",
        "| process | idle CPU s/s | busy CPU s/s | extra CPU ms per relayed query | extra CPU s/s per stream |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k, label in (("P2", "P2, the relay"), ("s1", "s1, the executor"), ("s2", "s2, the origin")):
        ri, rb = idle[k] / idle["wall_s"], busy[k] / busy["wall_s"]
        ex = busy[k] - ri * busy["wall_s"]
        lines.append(f"| {label} | {ri:.3f} | {rb:.3f} | {1000 * ex / nq:.3f} | {(rb - ri) / a.streams:.3f} |")
    lines += [
        "",
        f"The relay spent {1000 * extra / nq:.2f} ms of CPU per relayed query "
        f"({(rate_busy - rate_idle) / a.streams:.3f} CPU-seconds per second per stream, "
        f"{100 * (rate_busy - rate_idle):.0f}% of a core for {a.streams} streams) against "
        f"{1000 * rate_idle:.1f} ms/s idle.",
        "",
    ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_netns",
        description="On the network-namespace testbed: time to reachable behind NAT, chat query "
        "latency direct / relayed / hole-punched against local and raw-libp2p baselines, and a "
        "relay's CPU per relayed stream; print a markdown section.",
    )
    add = parser.add_argument
    add("--n", type=int, default=100, help="timed queries per path (default 100)")
    add("--warmup", type=int, default=10, help="untimed queries first (default 10)")
    add("--batch", type=int, default=10, help="queries per path per turn, the paths taking turns (default 10)")
    add("--tokens", type=int, default=1, help="max_tokens of each chat query (default 1)")
    add("--runs", type=int, default=3, help="start-to-reachable runs (default 3)")
    add("--streams", type=int, default=4, help="concurrent query loops through the relay (default 4)")
    add("--idle-s", type=float, default=10.0, help="seconds the relay's idle CPU is measured (default 10)")
    add("--busy-s", type=float, default=15.0, help="seconds the loops run through the relay (default 15)")
    add("--out", type=Path, help="markdown file whose section to rewrite")
    # Inside a namespace: the websocket client, and bench_routing's raw echo pair.
    add("--client", help=argparse.SUPPRESS)
    add("--echo-client", action="store_true", help=argparse.SUPPRESS)
    add("--turns", action="store_true", help=argparse.SUPPRESS)
    add("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    add("--duration", type=float, default=120.0, help=argparse.SUPPRESS)
    add("--want-executor", default="", help=argparse.SUPPRESS)
    add("--want-note", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.client:
        return client_main(args)
    if args.echo_client:
        return echo_client_main(args)
    if min(args.n, args.batch, args.runs, args.streams, args.tokens) < 1 or args.warmup < 0:
        parser.error("--n, --batch, --runs, --streams and --tokens must be >= 1, --warmup >= 0")
    if args.idle_s <= 0 or args.busy_s <= 0:
        parser.error("--idle-s and --busy-s must be > 0")
    why = tb.unavailable()
    if why:
        print(f"bench_netns: no testbed here: {why}", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: Any) -> None:
        # Raising here could land inside a wait; stop what we started and leave.
        stop_all()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run_benchmark(args)
    except (BenchError, AssertionError, tb.TestbedError, subprocess.SubprocessError) as exc:
        print(f"bench_netns: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all()  # clients left running after an error
    section = render(results, machine_info())
    print(section)
    if args.out:
        write_section(args.out, SECTION_HEADING, section)
        progress(f"wrote the section {SECTION_HEADING!r} of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
