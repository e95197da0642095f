"""Benchmark: a routed chat query against the baselines it is built on, all in one run.

    python -m rentahal.scripts.bench_routing [--n 200] [--tokens 8] [--warmup 10]
                                             [--out BENCHMARKS.md]
    python scripts/bench_routing.py ...

Measured one after another on this machine, each after its own warm-up, timed with
``time.perf_counter``, one request in flight at a time:

1. Baseline A, raw py-libp2p: a child process (this script behind the hidden ``--echo-server``
   flag) runs a host built by ``open_federation_host`` that echoes length-prefixed frames on
   ``/bench/echo/1.0.0``; this process dials it and times (a) request/response on one
   long-lived stream, which is what the query protocol does (queries to a peer share one
   stream), and (b) a new stream per request, what its version 1 did.
2. Baseline B, direct llama-cpp-python: ``ChatBackend`` on the tiny smoke-test model, in process.
3. Local node query: node B (``serve="chat"``) started with ``scripts/federation.py``, the chat
   payload submitted to B's own websocket.
4. Routed query: node A (``serve="none"``, bootstrap B); the payload submitted to A's websocket
   travels A -> B over ``/rentahal/query/2.0.0``.

Prints a markdown section; with ``--out`` it also replaces that section of the file (from its
heading to the next ``## `` heading or the end), leaving every other section as it was.
Benchmarks are run on demand, never in CI.
"""

from __future__ import annotations

import argparse
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
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from rentahal.scripts.benchreport import (
    command_line,
    machine_info,
    other_cpu_share,
    write_section,
)
from rentahal.scripts.benchreport import cpu_times as _cpu_times

ECHO_PROTOCOL = "/bench/echo/1.0.0"
SECTION_HEADING = "## Routed chat query vs raw libp2p round trip"
ECHO_BODY_BYTES = 96  # + the 4-byte length prefix = a 100-byte request
REQUEST_TIMEOUT = 30.0


# What to stop if the run is killed with SIGTERM (Ctrl-C unwinds through the finally blocks).
_on_exit: list[Callable[[], None]] = []


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


def progress(msg: str) -> None:
    print(f"[bench_routing] {msg}", file=sys.stderr, flush=True)


# --- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    label: str
    samples_s: list[float]
    wall_s: float
    results: list[Any] = field(default_factory=list, repr=False)

    def _q(self, p: int) -> float:
        if len(self.samples_s) == 1:
            return self.samples_s[0]
        return statistics.quantiles(self.samples_s, n=100, method="inclusive")[p - 1]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.samples_s) * 1000.0

    @property
    def p99_ms(self) -> float:
        return self._q(99) * 1000.0

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_s) * 1000.0

    @property
    def rps(self) -> float:
        return len(self.samples_s) / self.wall_s if self.wall_s > 0 else 0.0


async def time_calls(label: str, call: Callable[[], Awaitable[Any]], n: int, warmup: int) -> Timing:
    """Await ``call`` ``warmup`` times untimed, then ``n`` times timed, one at a time."""
    for _ in range(warmup):
        with trio.fail_after(REQUEST_TIMEOUT):
            await call()
    samples: list[float] = []
    results: list[Any] = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        with trio.fail_after(REQUEST_TIMEOUT):
            res = await call()
        samples.append(time.perf_counter() - t0)
        results.append(res)
    wall = time.perf_counter() - start
    t = Timing(label, samples, wall, results)
    progress(f"{label}: p50 {t.p50_ms:.2f} ms, p99 {t.p99_ms:.2f} ms, {t.rps:.0f} req/s")
    return t


# --- baseline A: raw py-libp2p echo ---------------------------------------------------------


def _ephemeral_identity() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from rentahal.p2p.identity import Identity

    return Identity(Ed25519PrivateKey.generate())


def _stream_done_errors() -> tuple[type[BaseException], ...]:
    from libp2p.exceptions import BaseLibp2pError

    return (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def _read_frame(stream: Any, buf: bytearray) -> bytes | None:
    """One length-prefixed frame from ``stream`` (``buf`` keeps what was read beyond it)."""
    from libp2p.network.stream.exceptions import StreamEOF

    while True:
        if len(buf) >= 4:
            end = 4 + int.from_bytes(buf[:4], "big")
            if len(buf) >= end:
                frame = bytes(buf[:end])
                del buf[:end]
                return frame
        try:
            chunk = await stream.read(64 * 1024)
        except StreamEOF:
            chunk = b""
        if not chunk:
            if buf:
                raise BenchError(f"stream ended inside a frame ({len(buf)} bytes buffered)")
            return None
        buf += chunk


async def _echo_main() -> None:
    from rentahal.p2p.host import open_federation_host

    async def handle(stream: Any) -> None:
        buf = bytearray()
        try:
            while (frame := await _read_frame(stream, buf)) is not None:
                await stream.write(frame)
        except _stream_done_errors():
            pass
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except _stream_done_errors():
                    pass

    async with open_federation_host(_ephemeral_identity(), ["/ip4/127.0.0.1/tcp/0"]) as fh:
        fh.set_stream_handler(ECHO_PROTOCOL, handle)
        print(f"ECHO_READY {fh.addrs()[0]}", flush=True)
        await trio.sleep_forever()


def run_echo_server() -> None:
    """The child process of baseline A. It exits when its parent closes our stdin (or dies)."""

    def watch_parent() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    trio.run(_echo_main)


class EchoChild:
    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "echo-server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--echo-server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def wait_addr(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith("ECHO_READY "):
                return line.split()[1]
            if line == "":
                raise BenchError(f"echo server exited ({self.proc.wait()}):\n{self.log_tail()}")
        raise BenchError(f"echo server not ready within {timeout:g}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._log.close()


async def measure_libp2p(addr: str, n: int, warmup: int) -> tuple[Timing, Timing]:
    from libp2p.peer.id import ID

    from rentahal.p2p.host import open_federation_host

    frame = ECHO_BODY_BYTES.to_bytes(4, "big") + os.urandom(ECHO_BODY_BYTES)

    async def round_trip(stream: Any, buf: bytearray) -> None:
        await stream.write(frame)
        back = await _read_frame(stream, buf)
        if back != frame:
            raise BenchError("the echo server answered something else than the request")

    async with open_federation_host(_ephemeral_identity(), ["/ip4/127.0.0.1/tcp/0"]) as fh:
        peer = ID.from_base58(await fh.dial(addr, timeout=10))

        stream = await fh.host.new_stream(peer, [ECHO_PROTOCOL])
        buf = bytearray()
        one = await time_calls("raw libp2p, one stream", lambda: round_trip(stream, buf), n, warmup)
        await stream.close()

        async def fresh_stream() -> None:
            s = await fh.host.new_stream(peer, [ECHO_PROTOCOL])
            try:
                await round_trip(s, bytearray())
            finally:
                await s.close()

        per_request = await time_calls("raw libp2p, new stream per request", fresh_stream, n, warmup)
    return one, per_request


# --- baseline B: direct llama-cpp-python ----------------------------------------------------


def chat_payload(tokens: int) -> dict[str, Any]:
    return {
        "prompt": "hello",
        "max_tokens": tokens,
        "seed": 1,
        "temperature": 0,
        "ignore_eos": True,
    }


def chat_limits(tokens: int) -> tuple[int, int]:
    """(max_tokens cap, n_ctx): the node's defaults, raised only if --tokens needs more."""
    return max(512, tokens), max(2048, tokens + 64)


async def measure_llama(model: Path, tokens: int, n: int, warmup: int) -> Timing:
    from rentahal.models.chat import ChatBackend

    cap, n_ctx = chat_limits(tokens)
    # The node builds its backend the same way: threads=0 (all cores), no GPU layers.
    backend = ChatBackend(model, n_ctx=n_ctx, max_tokens_cap=cap)
    await backend.load()
    payload = chat_payload(tokens)

    async def sink(event: Any) -> None:
        pass

    async def one() -> dict[str, Any]:
        res = await backend.generate(payload, sink)
        return res.stats

    try:
        return await time_calls(f"direct llama.cpp, {tokens} tokens", one, n, warmup)
    finally:
        await backend.aclose()


# --- the nodes: local and routed queries over the websocket ---------------------------------


async def measure_node(label: str, ws_url: str, tokens: int, n: int, warmup: int) -> Timing:
    """Submit the chat payload to a node's websocket; time submit -> result message."""
    from trio_websocket import open_websocket_url

    payload = chat_payload(tokens)
    rid = 0
    async with open_websocket_url(ws_url) as ws:

        async def one() -> dict[str, Any]:
            nonlocal rid
            rid += 1
            t0 = time.perf_counter()
            await ws.send_message(json.dumps({"op": "submit_query", "rid": rid, "realm": "chat", "payload": payload}))
            marks: dict[str, float] = {}  # ms since submit of the first event of each kind
            while True:
                msg = json.loads(await ws.get_message())
                now = (time.perf_counter() - t0) * 1000.0
                if msg.get("rid") != rid:
                    continue
                if msg.get("op") == "event":
                    kind = msg["event"].get("type", "?")
                    marks.setdefault(kind, now)
                    if kind == "token":
                        marks["last_token"] = now
                    continue
                if msg.get("op") == "result":
                    marks["result"] = now
                    return {**msg["result"], "_marks": marks}
                raise BenchError(f"{label}: query {rid} failed: {msg}")

        return await time_calls(label, one, n, warmup)


# --- report ---------------------------------------------------------------------------------


def other_load() -> str:
    """How busy the machine is before the run (other processes skew every figure)."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    t1 = _cpu_times()
    time.sleep(1.0)
    t2 = _cpu_times()
    if t1 is None or t2 is None or t2[0] == t1[0]:
        return f"load average {load}"
    busy = 100.0 * (1 - (t2[1] - t1[1]) / (t2[0] - t1[0]))
    if busy > 10:
        progress(f"warning: the CPUs were {busy:.0f}% busy before the run: figures will be noisy")
    return f"CPUs {busy:.0f}% busy in the second before (load average {load})"


@dataclass
class Results:
    n: int
    tokens: int
    warmup: int
    one_stream: Timing
    new_stream: Timing
    llama: Timing
    local: Timing
    routed: Timing
    b_peer: str
    load_before: str
    others_cpu: str
    started: _dt.datetime
    elapsed_s: float


def _row(label: str, t: Timing) -> str:
    return f"| {label} | {len(t.samples_s)} | {t.p50_ms:.2f} | {t.p99_ms:.2f} | {t.mean_ms:.2f} | {t.rps:.0f} |"


# Client-side phases of a node query: (short name, label, from mark, to mark); marks are the first
# event of each kind as the websocket client saw it, so every phase includes its websocket delivery.
PHASES = (
    ("taking the query", "submit → `routed` event (the node takes the query, picks a route)", None, "routed"),
    (
        "reaching `accepted`",
        "→ `accepted` (local: queue admission; routed: stream opened, request sent, B admits it)",
        "routed",
        "accepted",
    ),
    ("the first token", "→ first token", "accepted", "token"),
    ("token streaming", "first → last token", "token", "last_token"),
    ("the result", "last token → result", "last_token", "result"),
)


def phase_medians(t: Timing) -> list[float]:
    out = []
    for _, _, start, end in PHASES:
        out.append(statistics.median(r["_marks"][end] - (r["_marks"][start] if start else 0.0) for r in t.results))
    return out


def _median_gen_ms(results: list[dict[str, Any]], key: str = "") -> float:
    return statistics.median(float((res[key] if key else res)["ms"]) for res in results)


def render(r: Results, info: dict[str, str]) -> str:
    T = r.tokens
    routing = r.routed.p50_ms - r.local.p50_ms
    routing_x = routing / r.one_stream.p50_ms  # queries share one long-lived stream now
    node_over = r.local.p50_ms - r.llama.p50_ms
    local_execs = Counter(res["executor"] for res in r.local.results)
    routed_execs = Counter(res["executor"] for res in r.routed.results)
    node_results = (*r.local.results, *r.routed.results)
    failovers = sum(1 for res in node_results if res.get("failovers"))
    all_stats = (*r.llama.results, *(res["stats"] for res in node_results))
    tok_counts = Counter(int(stats["tokens"]) for stats in all_stats)
    by_b = routed_execs.get(r.b_peer, 0)
    others = {k: v for k, v in routed_execs.items() if k != r.b_peer}
    local_desc = ", ".join(f"`{k}` for {v}" for k, v in local_execs.items())

    local_ph, routed_ph = phase_medians(r.local), phase_medians(r.routed)
    phase_rows = [
        f"| {label} | {lo:.2f} | {ro:.2f} | {ro - lo:+.2f} |"
        for (_, label, _, _), lo, ro in zip(PHASES, local_ph, routed_ph, strict=False)
    ]
    diffs = sorted(
        ((ro - lo, short) for (short, _, _, _), lo, ro in zip(PHASES, local_ph, routed_ph, strict=False)),
        reverse=True,
    )
    stream_diff = routed_ph[3] - local_ph[3]

    parts = {
        f"llama.cpp generating {T} tokens": r.llama.p50_ms,
        "the node's own path (websocket, bookkeeping, router, queue, per-token events)": node_over,
        "the A → B hop": routing,
    }
    total = r.routed.p50_ms
    accepted_diff = routed_ph[1] - local_ph[1]
    gen_local = _median_gen_ms(r.local.results, "stats")
    gen_routed = _median_gen_ms(r.routed.results, "stats")
    share = ", ".join(f"{ms:.2f} ms ({100 * ms / total:.0f}%) {name}" for name, ms in parts.items())
    dominant = max(parts, key=lambda k: parts[k])

    lines = [
        SECTION_HEADING,
        "",
        "```sh",
        command_line(),
        "```",
        "",
        f"Run {r.started.strftime('%Y-%m-%d %H:%M UTC')}: `nproc` {info['nproc']} ({info['cpu']}), "
        f"{r.load_before}, Python {info['python']}, "
        f"py-libp2p {info['libp2p']}, llama-cpp-python {info['llama']}, commit `{info['commit']}`; "
        f"the whole run took {r.elapsed_s:.0f} s, during which other processes used "
        f"{r.others_cpu} of the CPUs. Every row: {r.warmup} warm-up requests, then "
        f"{r.n} timed ones, one in flight at a time (req/s = timed requests / their wall time). "
        f"Chat payload `{json.dumps(chat_payload(T))}` on the 0.5 MB smoke-test model; "
        f"the echo request is a {4 + ECHO_BODY_BYTES}-byte length-prefixed frame.",
        "",
        "| measurement | n | p50 ms | p99 ms | mean ms | req/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _row("A. raw py-libp2p echo, one long-lived stream", r.one_stream),
        _row("A. raw py-libp2p echo, new stream per request", r.new_stream),
        _row(f"B. direct llama-cpp-python (`ChatBackend`), {T} tokens", r.llama),
        _row("local node query: websocket → B → llama.cpp", r.local),
        _row("routed query: websocket → A → B over `/rentahal/query/2.0.0`", r.routed),
        "",
        "| derived (from the p50s above) | value |",
        "| --- | ---: |",
        f"| routing overhead = routed − local | {routing:.2f} ms |",
        f"| routing overhead ÷ raw round trip on a long-lived stream | {routing_x:.1f}× |",
        f"| local node overhead = local − direct llama.cpp | {node_over:.2f} ms "
        f"({r.local.p50_ms / r.llama.p50_ms:.2f}× direct) |",
        "",
        "Where the time goes, as the websocket client sees it (p50 of each phase, ms):",
        "",
        "| phase | local | routed | routed − local |",
        "| --- | ---: | ---: | ---: |",
        *phase_rows,
        f"| of all this, B's `generate()` as it times itself (`stats.ms`; direct llama.cpp: "
        f"{_median_gen_ms(r.llama.results):.2f}) | {gen_local:.2f} | {gen_routed:.2f} "
        f"| {gen_routed - gen_local:+.2f} |",
        "",
        f"Executor of the {len(r.routed.results)} timed routed queries: B (`{r.b_peer}`) for {by_b}"
        + (f", others {others}" if others else "")
        + f"; of the {len(r.local.results)} local ones: {local_desc}; "
        f"queries that needed a failover: {failovers}. "
        f"Tokens per request (all three chat rows): {dict(sorted(tok_counts.items()))}.",
        "",
        f"Of the routed p50 ({total:.2f} ms), {share}: the largest part is {dominant}. "
        f"The hop costs {routing_x:.1f}× a bare echo on a long-lived stream (the floor: queries "
        f"to a peer share one stream); by phase, most of the difference is in {diffs[0][1]} "
        f"({diffs[0][0]:+.2f} ms) and {diffs[1][1]} ({diffs[1][0]:+.2f} ms). "
        f"Reaching `accepted` is one round trip through both nodes (the request, B admits it, "
        f"B's `accepted` frame back: {accepted_diff / r.one_stream.p50_ms:.1f}× a bare "
        f"echo); token streaming is {stream_diff:+.2f} ms, and B's own `generate()` "
        f"time goes from {gen_local:.2f} ms (local) to {gen_routed:.2f} ms (routed)"
        + (
            ": B's generating thread does not wait for the frames, but writing them is Python "
            "work on B's event loop that shares the GIL and the cores with it"
            if gen_routed - gen_local > 0.3 * max(stream_diff, 0.0)
            else ", so most of it is spent after B wrote each frame (transport, A relaying it)"
        )
        + f"; A, B and this client share {info['nproc']} cores.",
        "",
    ]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------


def run_benchmark(n: int, tokens: int, warmup: int) -> Results:
    from rentahal.models.smoke.tiny_llama import write_tiny_llama
    from rentahal.scripts.federation import Federation

    started = _dt.datetime.now(_dt.UTC)
    load_before = other_load()
    progress(f"before the run: {load_before}")
    cpu_start = (_cpu_times(), os.times())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_routing-") as tmp:
        work = Path(tmp)
        _on_exit.append(lambda: shutil.rmtree(tmp, ignore_errors=True))

        progress("baseline A: raw py-libp2p echo between two processes")
        echo = EchoChild(work)
        _on_exit.append(echo.kill)
        try:
            addr = echo.wait_addr()
            one_stream, new_stream = trio.run(measure_libp2p, addr, n, warmup)
        finally:
            echo.kill()

        progress(f"baseline B: direct llama-cpp-python, {tokens} tokens")
        model = write_tiny_llama(work / "tiny.gguf")
        llama = trio.run(measure_llama, model, tokens, n, warmup)

        progress("starting node B (serves chat) and node A (routes only, bootstrap B)")
        cap, n_ctx = chat_limits(tokens)
        # A sends B hundreds of queries a second: B's per-peer rate limit would refuse them.
        chat_settings = {"limits.peer_queries_per_minute": "0"}
        if (cap, n_ctx) != chat_limits(1):
            chat_settings |= {"realms.chat.max_tokens": str(cap), "realms.chat.n_ctx": str(n_ctx)}
        fed = Federation(work / "federation")
        _on_exit.append(fed.close)
        try:
            b = fed.start("B", serve="chat", settings=chat_settings)  # returns once chat loaded
            a = fed.start("A", serve="none", bootstrap=(b.addr,))
            a.wait_for(rf"peer {re.escape(b.peer_id)} is live \(serves: chat\)", 60)
            local = trio.run(measure_node, "local node query", b.ui, tokens, n, warmup)
            routed = trio.run(measure_node, "routed query", a.ui, tokens, n, warmup)
        finally:
            fed.close()
        elapsed = time.perf_counter() - t_start
        others = other_cpu_share(cpu_start, elapsed)
        progress(f"other processes used {others} of the CPUs during the run")
        return Results(
            others_cpu=others,
            n=n,
            tokens=tokens,
            warmup=warmup,
            one_stream=one_stream,
            new_stream=new_stream,
            llama=llama,
            local=local,
            routed=routed,
            b_peer=b.peer_id,
            load_before=load_before,
            started=started,
            elapsed_s=elapsed,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_routing",
        description="Time a routed chat query against a local one, direct llama.cpp and a raw "
        "py-libp2p round trip, all in one run; print a markdown section.",
    )
    add = parser.add_argument
    add("--n", type=int, default=200, help="timed requests per measurement (default 200)")
    add("--tokens", type=int, default=8, help="tokens generated per chat request (default 8)")
    add("--warmup", type=int, default=10, help="untimed requests first (default 10)")
    parser.add_argument("--out", type=Path, help="markdown file whose routing section to rewrite")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.echo_server:
        run_echo_server()
        return 0
    if args.n < 1 or args.tokens < 1 or args.warmup < 0:
        parser.error("--n and --tokens must be >= 1, --warmup >= 0")

    import logging

    logging.basicConfig(level=logging.WARNING)
    from rentahal.p2p.host import quiet_libp2p_logs

    quiet_libp2p_logs()

    def on_sigterm(signum: int, frame: Any) -> None:
        # Raising here could land inside trio's run loop; stop what we started and leave.
        for stop in reversed(_on_exit):
            try:
                stop()
            except Exception:
                pass
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run_benchmark(args.n, args.tokens, args.warmup)
    except (BenchError, AssertionError, trio.TooSlowError) as exc:
        print(f"bench_routing: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    section = render(results, machine_info())
    print(section)
    if args.out:
        write_section(args.out, SECTION_HEADING, section)
        progress(f"wrote the routing section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
