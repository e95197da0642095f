"""Benchmark: how fast a dead or frozen executor is left, by the query and by routing.

    python -m rentahal.scripts.bench_failover [--rounds 5] [--out BENCHMARKS.md]
    python scripts/bench_failover.py ...

Three real ``rentahal-node run`` processes on loopback, started with ``scripts/federation.py``
as ``tests/test_federation.py`` starts them: A routes only (``serve="none"``), B and C serve chat
with the smoke-test model (``realms.chat.max_tokens=4000``, ``realms.chat.n_ctx=4096``) and
bootstrap from A. Every node runs the shipped defaults otherwise. A's ``route chat`` is polled
over ONE websocket connection to A, kept open for the whole run (every 20 ms while waiting for a
change); a long query is ``{"prompt": ..., "max_tokens": 4000, "ignore_eos": true}`` submitted
to A's websocket. Every time is ``time.monotonic`` in this process, from just before the signal
to the arrival of the first poll answer (or query event) that shows the change. ``--rounds``
rounds of each:

1. killed idle executor: SIGKILL B while no query runs; kill -> B no longer among A's
   candidates. B is restarted (same data dir, so the same peer ID) and the next round waits
   until A lists it again.
2. killed executor mid-answer: a long query on A; at its first token, SIGKILL the executor it
   was routed to; kill -> ``failover`` event, kill -> out of A's candidates; the query must
   still end with exactly one result, from the other executor.
3. frozen executor mid-answer: the same with SIGSTOP: SIGSTOP -> ``failover`` ("query moved
   on"), SIGSTOP -> out of A's candidates ("out of routing"); then SIGCONT and wait until it is
   a candidate again.
4. frozen idle executor: SIGSTOP B while idle; SIGSTOP -> out of A's candidates; SIGCONT.
5. false positives: 20 s with both executors at full CPU (2 concurrent long queries on each
   executor through its own websocket, 2 more through A), route polled every 50 ms: failover
   events and times an executor left A's candidates are counted; both should be 0.

Prints a markdown section; with ``--out`` it also replaces that section of the file, leaving
every other section as it was. Every node process is stopped at the end, on errors too (a
frozen one gets SIGCONT first). Benchmarks are run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from rentahal.scripts.bench_routing import other_load
from rentahal.scripts.bench_throughput import proc_cpu_s
from rentahal.scripts.benchreport import (
    command_line,
    machine_info,
    other_cpu_share,
    write_section,
)
from rentahal.scripts.benchreport import cpu_times as _cpu_times

SECTION_HEADING = "## Failover: how fast a dead or frozen executor is left"
CHAT = {"realms.chat.max_tokens": "4000", "realms.chat.n_ctx": "4096"}
LONG = {"prompt": "tell me a long story", "max_tokens": 4000, "ignore_eos": True}
POLL_S = 0.02  # route poll interval while waiting for a change
FP_POLL_S = 0.05  # route poll interval during the false-positive window
FP_WINDOW_S = 20.0
FP_PER_CONNECTION = 2  # concurrent long queries on each of B's, C's and A's websockets
WAIT_S = 30.0  # the longest wait for a departure or a failover before it counts as "not within"
BACK_WAIT_S = 90.0  # the longest wait for an executor to be a candidate again
QUERY_END_S = 330.0  # the longest wait for a query to end (A ends it at its 300 s query_deadline)
FIRST_TOKEN_S = 60.0  # the longest wait for a long query's first token
CONFIG_KEYS = (
    "router.hang_timeout",
    "router.first_progress",
    "p2p.health_interval",
    "p2p.stale_after",
)

_on_exit: list[Callable[[], None]] = []  # what to stop if the run is killed with SIGTERM


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


def progress(msg: str) -> None:
    print(f"[bench_failover] {msg}", file=sys.stderr, flush=True)


# --- what is measured -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    target: str  # as shown
    limit: float | None  # seconds (or a count for the false positives); None: no target


ROWS = (
    RowSpec("killed_idle_out", "killed idle executor (SIGKILL) → out of A's routing", "≤ 0.2 s", 0.2),
    RowSpec(
        "killed_busy_failover",
        "killed executor mid-answer → `failover` event (query moved on)",
        "—",
        None,
    ),
    RowSpec("killed_busy_out", "killed executor mid-answer → out of A's routing", "≤ 0.2 s", 0.2),
    RowSpec(
        "frozen_busy_failover",
        "frozen executor mid-answer (SIGSTOP) → `failover` event (query moved on)",
        "≤ 2.5 s",
        2.5,
    ),
    RowSpec("frozen_busy_out", "frozen executor mid-answer → out of A's routing", "≤ 2 s", 2.0),
    RowSpec("frozen_idle_out", "frozen idle executor (SIGSTOP) → out of A's routing", "≤ 2 s", 2.0),
    RowSpec("fp_failovers", f"false positives, {FP_WINDOW_S:g} s at full CPU: `failover` events", "0", 0),
    RowSpec(
        "fp_left",
        f"false positives, {FP_WINDOW_S:g} s at full CPU: an executor left A's candidates",
        "0",
        0,
    ),
    RowSpec("restart_back", "(for reference) restarted executor: ready → back in A's routing", "—", None),
    RowSpec("sigcont_back", "(for reference) SIGCONT → back in A's routing", "—", None),
)
COUNTS = {"fp_failovers", "fp_left"}


@dataclass
class Results:
    rounds: int
    samples: dict[str, list[float]] = field(default_factory=lambda: {r.key: [] for r in ROWS})
    reasons: dict[str, Counter[str]] = field(default_factory=lambda: {r.key: Counter() for r in ROWS})
    rounds_text: dict[str, list[str]] = field(default_factory=dict)  # per scenario, one line a round
    notes: list[str] = field(default_factory=list)  # anything that looked wrong
    route_rtts: list[float] = field(default_factory=list)
    survivor_s: list[float] = field(default_factory=list)  # failover -> result, mid-answer rounds
    config: dict[str, Any] = field(default_factory=dict)
    peers: dict[str, str] = field(default_factory=dict)  # peer ID -> B | C
    load_before: str = ""
    others_cpu: str = ""
    started: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.UTC))
    elapsed_s: float = 0.0

    def add(self, key: str, value: float, reason: str = "") -> None:
        self.samples[key].append(value)
        if reason:
            self.reasons[key][_reason_kind(reason)] += 1

    def note(self, msg: str) -> None:
        progress(f"NOTE: {msg}")
        self.notes.append(msg)

    def line(self, scenario: str, text: str) -> None:
        progress(f"{scenario}: {text}")
        self.rounds_text.setdefault(scenario, []).append(text)


def _reason_kind(reason: str) -> str:
    """An exclusion reason without its numbers (``stale: no health record for 3.6s`` -> ``stale``)."""
    return reason.split(":", 1)[0].strip() or reason


# --- talking to the nodes ---------------------------------------------------------------------


class RoutePoller:
    """``route chat`` on A over one websocket connection, kept open for the whole run."""

    def __init__(self, client: Any, res: Results) -> None:
        self.client = client
        self.res = res

    async def plan(self) -> tuple[float, set[str], dict[str, str]]:
        """(arrival time, candidate executors, excluded executor -> reason)."""
        t0 = time.monotonic()
        with trio.fail_after(WAIT_S):
            ans = await self.client.call("route", realm="chat")
        t = time.monotonic()
        self.res.route_rtts.append(t - t0)
        route = ans["route"]
        return (
            t,
            {c["executor"] for c in route["candidates"]},
            {x["executor"]: x["reason"] for x in route["excluded"]},
        )

    async def until(
        self, pred: Callable[[set[str]], bool], timeout: float, interval: float = POLL_S
    ) -> tuple[float | None, dict[str, str]]:
        """Poll until ``pred(candidates)``: (the arrival time of that answer, its exclusions), or
        (None, the last exclusions) after ``timeout``."""
        deadline = time.monotonic() + timeout
        next_at = time.monotonic()
        while True:
            t, cands, excluded = await self.plan()
            if pred(cands):
                return t, excluded
            if t >= deadline:
                return None, excluded
            next_at = max(next_at + interval, time.monotonic())
            await trio.sleep(max(0.0, next_at - time.monotonic()))

    async def until_out(self, peer: str, timeout: float = WAIT_S) -> tuple[float | None, str]:
        t, excluded = await self.until(lambda c: peer not in c, timeout)
        return t, excluded.get(peer, "(not listed at all)")

    async def until_in(self, peers: list[str], timeout: float = BACK_WAIT_S) -> float | None:
        t, _ = await self.until(lambda c: all(p in c for p in peers), timeout, interval=0.1)
        return t


@dataclass(eq=False)
class QueryRun:
    """One query submitted over a websocket, its messages stamped as they arrive."""

    label: str
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    first_token: trio.Event = field(default_factory=trio.Event)
    failover: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    routed: list[str] = field(default_factory=list)
    failovers: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    executor_at_first_token: str = ""
    query_id: str = ""
    submitted: float = 0.0

    async def run(self, client: Any, payload: dict[str, Any] = LONG) -> None:
        self.submitted = time.monotonic()
        try:
            async for msg in client.stream("submit_query", realm="chat", payload=payload):
                t = time.monotonic()
                self.messages.append((t, msg))
                if msg["op"] == "event":
                    event = msg["event"]
                    self.query_id = self.query_id or event.get("query_id", "")
                    kind = event.get("type")
                    if kind == "routed":
                        self.routed.append(event["executor"])
                    elif kind == "token" and not self.first_token.is_set():
                        self.executor_at_first_token = self.routed[-1] if self.routed else ""
                        self.first_token.set()
                    elif kind == "failover":
                        self.failovers.append((t, event))
                        self.failover.set()
                elif msg["op"] == "result":
                    self.results.append(msg["result"])
                else:
                    self.errors.append(msg)
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self.errors.append({"op": "error", "code": "connection_closed", "message": "the node hung up"})
        finally:
            self.done.set()


async def wait_event(event: trio.Event, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        await event.wait()
        return True
    return False


def _fmt_s(x: float) -> str:
    return f"not within {WAIT_S:g} s" if math.isinf(x) else f"{x:.3f} s"


# --- the scenarios ----------------------------------------------------------------------------


class Bench:
    def __init__(self, fed: Any, a: Any, execs: dict[str, Any], res: Results) -> None:
        self.fed = fed
        self.a = a
        self.execs = execs  # "B" | "C" -> its current NodeProcess
        self.res = res
        self.frozen: set[Any] = set()
        self.poll: RoutePoller
        self.qa: Any  # A's websocket for the queries (not the poller's)

    def name(self, peer: str) -> str:
        return self.res.peers.get(peer, peer[:12])

    def node(self, peer: str) -> Any:
        return self.execs[self.name(peer)]

    def all_peers(self) -> list[str]:
        return [n.peer_id for n in self.execs.values()]

    async def settle(self) -> None:
        """Both executors are A's candidates (nothing else is asked of the federation)."""
        if await self.poll.until_in(self.all_peers()) is None:
            _, cands, excluded = await self.poll.plan()
            raise BenchError(
                f"B and C are not both A's candidates after {BACK_WAIT_S:g}s: "
                f"candidates {sorted(map(self.name, cands))}, excluded "
                f"{ {self.name(k): v for k, v in excluded.items()} }"
            )

    async def restart(self, name: str) -> None:
        """Start ``name`` again on its data dir and wait until A routes to it."""
        old = self.execs[name]
        if old.proc is not None and old.proc.poll() is None:
            raise BenchError(f"{name} is still running")
        node = await trio.to_thread.run_sync(
            lambda: self.fed.start(name, serve="chat", bootstrap=(self.a.addr,), settings=CHAT)
        )
        ready = time.monotonic()
        if node.peer_id != old.peer_id:
            raise BenchError(f"{name} came back as {node.peer_id}, not {old.peer_id}")
        self.execs[name] = node
        back = await self.poll.until_in([node.peer_id])
        self.res.add("restart_back", math.inf if back is None else back - ready)
        if back is None:
            raise BenchError(f"restarted {name} is not A's candidate after {BACK_WAIT_S:g}s")

    def freeze(self, node: Any) -> float:
        self.frozen.add(node)
        t = time.monotonic()
        node.signal(signal.SIGSTOP)
        return t

    def thaw(self, node: Any) -> float:
        t = time.monotonic()
        node.signal(signal.SIGCONT)
        self.frozen.discard(node)
        return t

    def thaw_all(self) -> None:
        for node in list(self.frozen):
            self.thaw(node)

    async def precheck(self, peer: str, what: str) -> None:
        _, cands, excluded = await self.poll.plan()
        if peer not in cands:
            self.res.note(
                f"{what}: {self.name(peer)} was not A's candidate even before the signal "
                f"({excluded.get(peer, 'not listed')})"
            )

    # 1 -------------------------------------------------------------------------------------
    async def killed_idle(self, i: int) -> None:
        await self.settle()
        b = self.execs["B"]
        await self.precheck(b.peer_id, f"killed idle, round {i}")
        t0 = time.monotonic()
        b.signal(signal.SIGKILL)
        t, reason = await self.poll.until_out(b.peer_id)
        dt = math.inf if t is None else t - t0
        self.res.add("killed_idle_out", dt, reason)
        await trio.to_thread.run_sync(b.proc.wait)
        self.res.line("killed idle", f"round {i}: out of routing after {_fmt_s(dt)} ({reason})")
        if t is None:
            self.res.note(f"killed idle round {i}: B still A's candidate {WAIT_S:g}s after SIGKILL")
        await self.restart("B")

    # 2, 3 ----------------------------------------------------------------------------------
    async def mid_answer(self, i: int, sig: int) -> None:
        killed = sig == signal.SIGKILL
        what = "killed mid-answer" if killed else "frozen mid-answer"
        prefix = "killed_busy" if killed else "frozen_busy"
        await self.settle()
        q = QueryRun(f"{what} {i}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(q.run, self.qa)
            if not await wait_event(q.first_token, FIRST_TOKEN_S) or not q.executor_at_first_token:
                raise BenchError(f"{what} round {i}: no first token within {FIRST_TOKEN_S:g}s (errors {q.errors})")
            peer = q.executor_at_first_token
            if peer not in self.res.peers:
                raise BenchError(f"{what} round {i}: routed to {peer}, neither B nor C")
            victim = self.node(peer)
            await self.precheck(peer, f"{what}, round {i}")
            failover_at: float | None = None
            out_at: float | None = None
            back: float | None = None
            reason = ""
            try:
                if killed:
                    t0 = time.monotonic()
                    victim.signal(signal.SIGKILL)
                else:
                    t0 = self.freeze(victim)

                async def watch_route() -> None:
                    nonlocal out_at, reason
                    out_at, reason = await self.poll.until_out(peer)

                async def watch_failover() -> None:
                    nonlocal failover_at
                    if await wait_event(q.failover, WAIT_S):
                        failover_at = q.failovers[0][0]

                async with trio.open_nursery() as watch:
                    watch.start_soon(watch_route)
                    watch.start_soon(watch_failover)
            finally:
                if not killed:
                    cont = self.thaw(victim)
            fo = math.inf if failover_at is None else failover_at - t0
            out = math.inf if out_at is None else out_at - t0
            fo_kind = q.failovers[0][1].get("kind", "?") if q.failovers else ""
            self.res.add(f"{prefix}_failover", fo, fo_kind)
            self.res.add(f"{prefix}_out", out, reason)
            if killed:
                await trio.to_thread.run_sync(victim.proc.wait)
            else:  # back in routing, timed from SIGCONT while the query goes on

                async def watch_back() -> None:
                    nonlocal back
                    back = await self.poll.until_in([peer])

                nursery.start_soon(watch_back)
            with trio.move_on_after(QUERY_END_S):
                await q.done.wait()
            if not q.done.is_set():
                raise BenchError(f"{what} round {i}: the query did not end within {QUERY_END_S:g}s")
        # The query must end with exactly one result, from the other executor, complete.
        survivor = next(p for p in self.res.peers if p != peer)
        result = q.results[0] if len(q.results) == 1 else None
        bad = []
        if len(q.results) != 1 or q.errors:
            bad.append(f"{len(q.results)} result(s), errors {[(e.get('code'), e.get('message')) for e in q.errors]}")
        if len(q.failovers) != 1:
            bad.append(
                f"{len(q.failovers)} failover events "
                f"({[self.name(e['executor']) + ':' + str(e.get('kind')) for _, e in q.failovers]})"
            )
        if result is not None:
            if result.get("executor") != survivor:
                bad.append(f"answered by {self.name(result.get('executor', '?'))}")
            if list(result.get("failovers", [])) != [peer]:
                bad.append(f"result failovers {[self.name(p) for p in result.get('failovers', [])]}")
            if (result.get("stats") or {}).get("tokens") != LONG["max_tokens"]:
                bad.append(f"{(result.get('stats') or {}).get('tokens')} tokens, not {LONG['max_tokens']}")
        finished = ""
        if result is not None and failover_at is not None:
            self.res.survivor_s.append(q.messages[-1][0] - failover_at)
            finished = f" in {q.messages[-1][0] - failover_at:.1f} s after the failover"
        expected_kind = "dead" if killed else "hung"
        if fo_kind and fo_kind != expected_kind:
            bad.append(f"failover kind {fo_kind}, expected {expected_kind}")
        self.res.line(
            what,
            f"round {i}: {self.name(peer)} {'killed' if killed else 'frozen'} at its first token; "
            f"failover ({fo_kind or 'none'}) after {_fmt_s(fo)}, out of routing after {_fmt_s(out)} "
            f"({reason}); "
            + (
                f"one result, from {self.name(survivor)}, {LONG['max_tokens']} tokens{finished}"
                if not bad
                else "; ".join(bad)
            ),
        )
        if bad:
            self.res.note(f"{what} round {i}: " + "; ".join(bad))
        if math.isinf(fo):
            self.res.note(f"{what} round {i}: no failover event within {WAIT_S:g}s of the signal")
        if math.isinf(out):
            self.res.note(f"{what} round {i}: {self.name(peer)} still A's candidate {WAIT_S:g}s after the signal")
        if killed:
            await self.restart(self.name(peer))
        else:
            self.res.add("sigcont_back", math.inf if back is None else back - cont)
            if back is None:
                raise BenchError(f"{self.name(peer)} not A's candidate {BACK_WAIT_S:g}s after SIGCONT")

    # 4 -------------------------------------------------------------------------------------
    async def frozen_idle(self, i: int) -> None:
        await self.settle()
        b = self.execs["B"]
        await self.precheck(b.peer_id, f"frozen idle, round {i}")
        try:
            t0 = self.freeze(b)
            t, reason = await self.poll.until_out(b.peer_id)
        finally:
            cont = self.thaw(b)
        dt = math.inf if t is None else t - t0
        self.res.add("frozen_idle_out", dt, reason)
        self.res.line("frozen idle", f"round {i}: out of routing after {_fmt_s(dt)} ({reason})")
        if t is None:
            self.res.note(f"frozen idle round {i}: B still A's candidate {WAIT_S:g}s after SIGSTOP")
        back = await self.poll.until_in([b.peer_id])
        self.res.add("sigcont_back", math.inf if back is None else back - cont)
        if back is None:
            raise BenchError(f"B not A's candidate {BACK_WAIT_S:g}s after SIGCONT")

    # 5 -------------------------------------------------------------------------------------
    async def false_positives(self, i: int) -> None:
        """Six long queries in flight for the window (each worker starts its next one when one
        ends), then those still running are cancelled; route polled throughout."""
        from rentahal.scripts.federation import NodeError, connect

        await self.settle()
        peers = self.all_peers()
        failovers: list[str] = []
        errors: Counter[str] = Counter()
        answered: Counter[str] = Counter()  # by executor
        durations: list[float] = []  # submit -> result of the answered ones
        cancelled = 0
        left: list[tuple[str, float, str]] = []  # (executor, seconds into the window, A's reason)
        inflight: dict[QueryRun, Any] = {}  # -> its connection
        workers_done = trio.Event()
        pids = {name: n.proc.pid for name, n in self.execs.items()} | {"A": self.a.proc.pid}
        start = end = time.monotonic()

        async def worker(client: Any, via: str) -> None:
            nonlocal cancelled
            while time.monotonic() < end:
                q = QueryRun(f"fp via {via}")
                inflight[q] = client
                try:
                    await q.run(client)
                finally:
                    del inflight[q]
                for _, e in q.failovers:
                    failovers.append(f"via {via}: {self.name(e['executor'])} {e.get('kind')} ({e.get('message')})")
                for r in q.results:
                    durations.append(q.messages[-1][0] - q.submitted)
                    executor = r.get("executor", "?")
                    answered[via if executor == "local" else self.name(executor)] += 1
                for e in q.errors:
                    if e.get("code") == "cancelled" and time.monotonic() >= end:
                        cancelled += 1
                        continue
                    errors[f"via {via}: {e.get('code')}"] += 1
                    await trio.sleep(0.2)  # a refusal is not load: do not spin on it

        async def watch() -> None:
            inside = {p: True for p in peers}
            next_at = time.monotonic()
            while not workers_done.is_set():
                t, cands, excluded = await self.poll.plan()
                for p in peers:
                    if inside[p] and p not in cands:
                        left.append((self.name(p), t - start, excluded.get(p, "not listed")))
                    inside[p] = p in cands
                next_at = max(next_at + FP_POLL_S, time.monotonic())
                await trio.sleep(max(0.0, next_at - time.monotonic()))

        async def cancel_the_rest() -> None:
            await trio.sleep(max(0.0, end - time.monotonic()))
            for q, client in list(inflight.items()):
                with trio.move_on_after(2.0):
                    while not q.query_id and not q.done.is_set():
                        await trio.sleep(0.01)
                if q.query_id and not q.done.is_set():
                    try:
                        with trio.fail_after(WAIT_S):
                            await client.call("cancel", query_id=q.query_id)
                    except NodeError as exc:  # it ended meanwhile
                        if exc.code != "not_running":
                            raise

        async with (
            connect(self.execs["B"].ui) as cb,
            connect(self.execs["C"].ui) as cc,
            connect(self.a.ui) as ca,
        ):
            cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
            start = time.monotonic()
            end = start + FP_WINDOW_S
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with trio.open_nursery() as work:
                    for client, via in ((cb, "B"), (cc, "C"), (ca, "A")):
                        for _ in range(FP_PER_CONNECTION):
                            work.start_soon(worker, client, via)
                    await trio.sleep(max(0.0, end - time.monotonic()))
                    cpu = {name: 100.0 * (proc_cpu_s(pid) - cpu0[name]) / FP_WINDOW_S for name, pid in pids.items()}
                    await cancel_the_rest()
                workers_done.set()
            tail = time.monotonic() - end
        # After every query ended or was cancelled, the executors should go idle.
        await trio.sleep(0.5)
        idle0 = {name: proc_cpu_s(pid) for name, pid in pids.items() if name != "A"}
        await trio.sleep(1.0)
        idle = {name: 100.0 * (proc_cpu_s(pids[name]) - c) for name, c in idle0.items()}
        self.res.add("fp_failovers", float(len(failovers)))
        self.res.add("fp_left", float(len(left)))
        for _, _, reason in left:
            self.res.reasons["fp_left"][_reason_kind(reason)] += 1
        took = f", each {statistics.median(durations):.1f} s (median) from submit to result" if durations else ""
        self.res.line(
            "false positives",
            f"round {i}: CPU in the {FP_WINDOW_S:g} s window "
            + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(cpu.items()))
            + f" of one core; {sum(answered.values())} queries answered "
            f"({dict(sorted(answered.items()))} by executor){took}; {cancelled} cancelled at the "
            f"end of the window (all ended {tail:.1f} s after it), other errors "
            f"{dict(errors) or 0}; failover events {len(failovers)}, left A's candidates "
            f"{len(left)}; CPU of B and C in the second after: "
            + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(idle.items())),
        )
        if failovers:
            self.res.note(f"false positives round {i}: failover events: {failovers}")
        if left:
            self.res.note(
                f"false positives round {i}: left A's candidates: "
                + "; ".join(f"{who} at +{at:.2f} s ({reason})" for who, at, reason in left)
            )
        if errors:
            self.res.note(f"false positives round {i}: queries failed: {dict(errors)}")
        busy = {k: v for k, v in idle.items() if v > 50}
        if busy:
            self.res.note(
                f"false positives round {i}: executors still busy after every query "
                f"ended or was cancelled: " + ", ".join(f"{k} {v:.0f}% of one core" for k, v in busy.items())
            )


async def measure(bench: Bench, rounds: int) -> None:
    from rentahal.scripts.federation import connect

    async with connect(bench.a.ui) as poller, connect(bench.a.ui) as qa:
        bench.poll = RoutePoller(poller, bench.res)
        bench.qa = qa
        try:
            await bench.settle()
            progress("warm-up: one short query through A")
            warm = QueryRun("warm-up")
            with trio.fail_after(QUERY_END_S):
                await warm.run(qa, {"prompt": "hello", "max_tokens": 16})
            if len(warm.results) != 1 or warm.errors:
                raise BenchError(f"the warm-up query failed: {warm.errors}")
            progress("1. killed idle executor")
            for i in range(1, rounds + 1):
                await bench.killed_idle(i)
            progress("2. killed executor mid-answer")
            for i in range(1, rounds + 1):
                await bench.mid_answer(i, signal.SIGKILL)
            progress("3. frozen executor mid-answer")
            for i in range(1, rounds + 1):
                await bench.mid_answer(i, signal.SIGSTOP)
            progress("4. frozen idle executor")
            for i in range(1, rounds + 1):
                await bench.frozen_idle(i)
            progress(f"5. false positives: {FP_WINDOW_S:g} s at full CPU")
            for i in range(1, rounds + 1):
                await bench.false_positives(i)
        finally:
            bench.thaw_all()


# --- the run ----------------------------------------------------------------------------------


def config_in_force(data_dir: Path) -> dict[str, Any]:
    """The four keys as A loads them (its node.toml, no overrides), with the built-in defaults."""
    from rentahal.node.config import Config, load_config

    loaded, default = load_config(data_dir / "node.toml"), Config()
    out = {}
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        out[key] = (
            getattr(getattr(loaded, section), name),
            getattr(getattr(default, section), name),
        )
    return out


EXPECTED = (BenchError, AssertionError, trio.TooSlowError)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run_benchmark(rounds: int) -> Results:
    from rentahal.scripts.federation import Federation

    res = Results(rounds)
    res.load_before = other_load()
    progress(f"before the run: {res.load_before}")
    cpu_start = (_cpu_times(), os.times())
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_failover-") as tmp:
        fed = Federation(Path(tmp))
        bench: Bench | None = None

        def stop_all() -> None:
            if bench is not None:
                bench.thaw_all()
            fed.close()  # NodeProcess.stop sends SIGCONT before SIGTERM

        _on_exit.append(stop_all)
        try:
            progress("starting A (routes only), then B and C (serve chat, bootstrap A)")
            a = fed.start("A", serve="none")
            b, c = fed.start_many(["B", "C"], serve="chat", bootstrap=(a.addr,), settings=CHAT)
            for peer in (b, c):
                a.wait_for(rf"peer {peer.peer_id} is live \(serves: chat\)", 60)
            res.peers = {b.peer_id: "B", c.peer_id: "C"}
            res.config = config_in_force(a.data_dir)
            bench = Bench(fed, a, {"B": b, "C": c}, res)
            try:
                trio.run(measure, bench, rounds)
            except BaseExceptionGroup as group:  # a nursery's: surface a lone expected failure
                leaves = _leaves(group)
                if len(leaves) == 1 and isinstance(leaves[0], EXPECTED):
                    raise leaves[0] from group
                raise
        finally:
            stop_all()
            _on_exit.remove(stop_all)
    res.elapsed_s = time.monotonic() - t_start
    res.others_cpu = other_cpu_share(cpu_start, res.elapsed_s)
    progress(f"other processes used {res.others_cpu} of the CPUs during the run")
    return res


# --- report -----------------------------------------------------------------------------------


def _cell(key: str, value: float) -> str:
    if key in COUNTS:
        return f"{value:.0f}"
    return _fmt_s(value)


def missed(res: Results) -> list[str]:
    out = []
    for row in ROWS:
        xs = res.samples[row.key]
        if row.limit is None or not xs:
            continue
        worst = max(xs)
        if worst > row.limit:
            over = sum(1 for x in xs if x > row.limit)
            out.append(
                f"{row.label}: max {_cell(row.key, worst)}, median "
                f"{_cell(row.key, statistics.median(xs))} (target {row.target}; "
                f"{over} of {len(xs)} rounds over)"
            )
    return out


def render(res: Results, info: dict[str, str]) -> str:
    def cfg(key: str) -> str:
        value, default = res.config[key]
        shown = f"`{key}` = {value:g} s"
        return shown if value == default else f"{shown} (built-in default {default:g} s)"

    table = []
    for row in ROWS:
        xs = res.samples[row.key]
        if not xs:
            table.append(f"| {row.label} | — | — | {row.target} |")
            continue
        table.append(
            f"| {row.label} | {_cell(row.key, statistics.median(xs))} | {_cell(row.key, max(xs))} | {row.target} |"
        )
    samples = [
        f"- {row.label}: "
        + ", ".join(_cell(row.key, x).removesuffix(" s") for x in res.samples[row.key])
        + ("" if row.key in COUNTS else " s")
        + (
            "; A's exclusion reason: " + ", ".join(f"{k} ×{v}" for k, v in res.reasons[row.key].items())
            if res.reasons[row.key] and row.key.endswith(("_out", "_left"))
            else ""
        )
        + (
            "; failover kind: " + ", ".join(f"{k} ×{v}" for k, v in res.reasons[row.key].items())
            if res.reasons[row.key] and row.key.endswith("_failover")
            else ""
        )
        for row in ROWS
        if res.samples[row.key]
    ]
    per_round = [f"- {scenario}, {text}" for scenario, texts in res.rounds_text.items() for text in texts]
    survivor = (
        f"{statistics.median(res.survivor_s):.1f} s (median; max {max(res.survivor_s):.1f} s)"
        if res.survivor_s
        else "an unknown time"
    )
    rtt = statistics.median(res.route_rtts) * 1000.0 if res.route_rtts else float("nan")
    worse = missed(res)
    lines = [
        SECTION_HEADING,
        "",
        "```sh",
        command_line(),
        "```",
        "",
        (
            f"Run {res.started.strftime('%Y-%m-%d %H:%M UTC')}: `nproc` {info['nproc']} "
            f"({info['cpu']}), "
            f"{res.load_before}, Python {info['python']}, py-libp2p {info['libp2p']}, "
            f"llama-cpp-python {info['llama']}, commit `{info['commit']}`; the whole run took "
            f"{res.elapsed_s:.0f} s, during which other processes used {res.others_cpu} of the CPUs. "
            f"Three `rentahal-node run` processes on loopback: A routes only (`serve none`), B and C "
            f"serve chat with the smoke-test model (`realms.chat.max_tokens=4000`, "
            f"`realms.chat.n_ctx=4096`) and bootstrap from A; A, B, C and this client share the "
            f"{info['nproc']} cores. {res.rounds} rounds of each measurement. A long query is "
            f'`{{"max_tokens": 4000, "ignore_eos": true}}` submitted to A\'s websocket (after a '
            f"failover, the other executor's 4000 tokens took {survivor} from the `failover` "
            f"event to the result, a measure of how fast this machine generated); an "
            f"executor is killed (SIGKILL) or frozen (SIGSTOP) at its first token, an idle one while "
            f"no query runs. Each time runs, by `time.monotonic` in the benchmark process, from just "
            f"before the signal to the arrival of the first `route chat` answer (polled over one "
            f"websocket to A every {POLL_S * 1000:.0f} ms) or query event that shows the change, so "
            f"it includes up to one poll interval and a route round trip (median {rtt:.1f} ms). A "
            f"killed executor is restarted on its data dir (same peer ID), a frozen one gets SIGCONT, "
            f"and the next round starts once A routes to both again. The false-positive run keeps "
            f"{FP_PER_CONNECTION} long queries in flight on each of B's, C's and A's websockets for "
            f"{FP_WINDOW_S:g} s (each client starts its next one when one ends; those still "
            f"running at the end are cancelled), polling A's route every "
            f"{FP_POLL_S * 1000:.0f} ms."
        ),
        "",
        "Config in force on every node (the shipped node.toml, defaults from `node/config.py`): "
        + ", ".join(cfg(k) for k in CONFIG_KEYS)
        + ".",
        "",
        "| measurement | median | max | target |",
        "| --- | ---: | ---: | ---: |",
        *table,
        "",
        ("Targets missed: " + "; ".join(worse) + "." if worse else "Every target was met."),
        "",
        "Every round (seconds; counts for the false positives):",
        "",
        *samples,
        "",
        "Round by round:",
        "",
        *per_round,
    ]
    if res.notes:
        lines += ["", "What looked wrong:", "", *[f"- {n}" for n in res.notes]]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_failover",
        description="Time how fast a killed or frozen executor is left by a running query and "
        "by routing, with real node processes; print a markdown section.",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each measurement (default 5)")
    parser.add_argument("--out", type=Path, help="markdown file whose failover section to rewrite")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    import logging

    logging.basicConfig(level=logging.WARNING)

    def on_sigterm(signum: int, frame: Any) -> None:
        # Raising here could land inside trio's run loop; stop what we started and leave.
        for stop in reversed(_on_exit):
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"bench_failover: while stopping: {exc!r}", file=sys.stderr)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run_benchmark(args.rounds)
    except EXPECTED as exc:
        if isinstance(exc, trio.TooSlowError):  # says nothing by itself: show which wait
            traceback.print_exc()
        print(f"bench_failover: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    section = render(results, machine_info())
    print(section)
    if args.out:
        write_section(args.out, SECTION_HEADING, section)
        progress(f"wrote the failover section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
