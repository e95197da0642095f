"""Benchmark: routed chat queries per second with many concurrent websocket clients.

    python -m rentahal.scripts.bench_throughput [--clients 32] [--duration 20] [--warmup 3]
                                                [--variants relaxed,default] [--profile 15]
                                                [--profile-dir DIR] [--logs DIR]
                                                [--out BENCHMARKS.md]
    python scripts/bench_throughput.py ...

For each variant, three real node processes are started with ``scripts/federation.py``: two
executors E1 and E2 (``serve="chat"``, the smoke-test model) and a router R (``serve="none"``,
bootstrap E1 and E2). ``--clients`` websocket clients, each its own user, submit the chat
payload (``max_tokens`` 1) to R's websocket one after another, each keeping one query in flight,
so every query travels R -> E1|E2 over ``/rentahal/query/1.0.0``. After ``--warmup`` seconds the
``--duration`` window is measured: completions per second, latency (submit -> ``result``) of the
successful ones, failures by error code, and the CPU seconds of the three node processes (utime
+ stime of /proc/<pid>/stat, all threads) divided by the successful queries.

Variants: ``relaxed`` raises the executors' per-peer limit ([limits] peer_queries_per_minute,
peer_burst) and realms.chat.queue_limit so that only CPU bounds the rate; ``default`` runs the
shipped node.toml defaults. A client whose query failed waits ``--fail-backoff`` seconds before
its next one (a client spinning on instant refusals measures nothing).

With ``--profile S`` (relaxed variant only), after the measured window and under the same load,
py-spy samples R and the busier executor for S seconds (``py-spy record --native --format raw``,
every thread, Python and native frames). py-spy's idle detection does not see a thread blocked
on a lock, on the GIL or in epoll_wait as idle here, so samples that end in such a wait (a native
pthread_cond_timedwait / lock wait / epoll_wait, or a Python frame known to wait) are dropped;
their share is reported, and the kept samples are checked against the CPU /proc reports for the
same seconds (kept samples are wall-clock samples of threads not waiting, so with the cores
oversubscribed a thread that is runnable but preempted still counts: they overstate CPU by about
1.3-1.5x here, and the ms/query columns scale the shares to the CPU /proc measured). The hot
spots, by layer, by the innermost rentahal/libp2p component, by self time and by inclusive time,
with their CPU ms per query, are printed, written to ``DIR/summary.md`` (the raw stacks stay in
DIR) and summarised in the section. Profiling is kept out of the measured window since sampling
costs CPU on the same cores.

``--logs DIR`` keeps each node's log (e.g. to see why the ``default`` variant refuses queries).

Prints a markdown section; with ``--out`` it also replaces that section of the file, leaving
every other section as it was. Benchmarks are run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from rentahal.scripts.bench_routing import chat_payload, other_load
from rentahal.scripts.benchreport import (
    command_line,
    cpu_times,
    machine_info,
    other_cpu_share,
    write_section,
)

SECTION_HEADING = "## Routed throughput: many clients"
REQUEST_TIMEOUT = 60.0
TOKENS = 1
VARIANTS = {
    # Executors' settings; the router runs its defaults in both (loopback clients are not
    # rate-limited by default, and each client is its own user, so max_active is not hit).
    "relaxed": {
        "limits.peer_queries_per_minute": "1000000",
        "limits.peer_burst": "100000",
        "realms.chat.queue_limit": "1024",
    },
    "default": {},
    # The limits shipped before the query path's rebuild: each executor takes 20 queries a second
    # from a peer. Refused queries wait out the retry-after; none should fail.
    "tight": {
        "limits.peer_queries_per_minute": "1200",
        "limits.peer_burst": "200",
    },
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE_HZ = 100

_on_exit: list[Callable[[], None]] = []


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


def progress(msg: str) -> None:
    print(f"[bench_throughput] {msg}", file=sys.stderr, flush=True)


# --- CPU accounting -------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds (from /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def own_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class CpuSnap:
    t: float
    nodes: dict[str, float]
    own: float
    machine: tuple[int, int] | None

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnap:
        return cls(time.perf_counter(), {n: proc_cpu_s(p) for n, p in pids.items()}, own_cpu_s(), cpu_times())


# --- the load -------------------------------------------------------------------------------


@dataclass
class Done:
    t_end: float
    latency_s: float
    code: str | None  # None: a result
    executor: str = ""
    failovers: int = 0
    message: str = ""  # of a failure


@dataclass
class Load:
    done: list[Done] = field(default_factory=list)
    stop: bool = False

    def window(self, t0: float, t1: float) -> list[Done]:
        return [d for d in self.done if t0 <= d.t_end < t1]


async def client_loop(url: str, load: Load, fail_backoff: float) -> None:
    """One websocket client: its own user, one query in flight, the next as soon as it ends."""
    from trio_websocket import ConnectionClosed, HandshakeError

    from rentahal.scripts.federation import NodeError, connect

    payload = chat_payload(TOKENS)
    guid = uuid.uuid4().hex
    while not load.stop:
        t_conn = time.perf_counter()
        try:
            async with connect(url, guid=guid) as client:
                while not load.stop:
                    t0 = time.perf_counter()
                    code: str | None = "no_answer"
                    res: dict[str, Any] = {}
                    message = ""
                    try:
                        with trio.fail_after(REQUEST_TIMEOUT):
                            async for msg in client.stream("submit_query", realm="chat", payload=payload):
                                if msg["op"] == "result":
                                    code, res = None, msg["result"]
                                elif msg["op"] == "error":
                                    code, message = str(msg.get("code", "?")), str(msg.get("message", ""))
                    except trio.TooSlowError:
                        code = "client_timeout"
                    except trio.EndOfChannel:
                        code = "connection_closed"
                    now = time.perf_counter()
                    load.done.append(
                        Done(
                            now, now - t0, code, str(res.get("executor", "")), len(res.get("failovers") or ()), message
                        )
                    )
                    if code == "connection_closed":
                        break
                    if code is not None:
                        await trio.sleep(fail_backoff)
        except (OSError, ConnectionClosed, HandshakeError, NodeError) as exc:
            now = time.perf_counter()
            code = exc.code if isinstance(exc, NodeError) else f"connect: {type(exc).__name__}"
            load.done.append(Done(now, now - t_conn, code, message=str(exc)))
            await trio.sleep(fail_backoff)


# --- profiling ------------------------------------------------------------------------------


async def py_spy(pid: int, seconds: float, out: Path) -> str:
    """``py-spy record`` of ``pid`` into a raw (collapsed stacks) file; returns py-spy's output."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        raise BenchError("py-spy is not installed (pip install py-spy) and --profile was given")
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(PROFILE_HZ),
        "--native",
        "--format",
        "raw",
        "--nolineno",
        "--full-filenames",
        "--threads",
        "--output",
        str(out),
    ]
    res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    text = (res.stdout + res.stderr).decode(errors="replace")
    if res.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy on pid {pid} exited {res.returncode}: {text[-2000:]}")
    return text


# Where a sample's CPU goes, by the innermost frame that belongs to a known layer. Checked in
# order against "function (file)"; the first pattern that matches the leaf-most frame wins.
LAYERS: tuple[tuple[str, str], ...] = (
    ("CPython garbage collector", r"^gc_collect|^collect_with_callback"),
    ("llama.cpp generation", r"/llama_cpp/|/models/chat\.py|libllama|libggml"),
    (
        "noise (encrypt/decrypt, handshake)",
        r"/libp2p/security/|/noise/|/cryptography/|/nacl/|/coincurve/|libcrypto|_rust\.abi3|_cffi_backend",
    ),
    ("yamux", r"/libp2p/stream_muxer/"),
    ("multistream-select", r"/libp2p/protocol_muxer/|multistream"),
    ("libp2p pubsub (gossip)", r"/libp2p/pubsub/"),
    ("libp2p kad-dht", r"/libp2p/kad_dht/"),
    ("libp2p identify/peerstore/other", r"/libp2p/(identity|peer|host/basic_host|host/autonat)"),
    (
        "libp2p TCP connection I/O (raw read/write)",
        r"/libp2p/io/|/libp2p/network/connection/raw_connection\.py|/libp2p/transport/tcp/",
    ),
    ("libp2p swarm/host/net stream", r"/libp2p/"),
    ("protobuf", r"/google/protobuf/"),
    ("msgpack / query wire codec", r"/msgpack/|/p2p/wire\.py"),
    ("sqlite (storage threads)", r"/sqlite_utils/|/sqlite3/|/node/storage\.py|_sqlite3|libsqlite3"),
    ("json", r"/json/|/_json\."),
    ("logging", r"/logging/"),
    ("websocket (trio-websocket, wsproto)", r"/trio_websocket/|/wsproto/|/h11/"),
    ("trio socket I/O (send/recv syscalls)", r"/trio/_socket\.py|/trio/_highlevel_socket\.py"),
    ("trio threads (to_thread hand-off)", r"/trio/_threads\.py|/trio/_core/_thread_cache\.py"),
    ("trio scheduler/event loop", r"/trio/|<attrs generated methods trio\.|/outcome/"),
    ("rentahal health/peers/maintenance", r"/p2p/(health|peers|maintenance|gossip|reachability|relay|discovery)\.py"),
    ("rentahal query protocol (p2p/query.py)", r"/p2p/query\.py"),
    ("rentahal router/queries/executor/control", r"/(realms|node)/"),
    ("uuid/random/hashing", r"/uuid\.py|/random\.py|/hashlib\.py|/secrets\.py"),
    ("dataclasses/typing/enum", r"/dataclasses\.py|/typing\.py|/enum\.py|/abc\.py"),
    ("threading/queue", r"/threading\.py|/queue\.py"),
)
_LAYER_RX = [(name, re.compile(rx)) for name, rx in LAYERS]
# Layers that do work on behalf of others: the "component" view skips them and charges the
# sample to the innermost frame of an application layer (libp2p, rentahal, websocket, ...).
PLUMBING = ("trio ", "dataclasses/", "threading/", "uuid/")
# A sample is a thread waiting, not using a CPU, when the native frames below its innermost Python
# frame hold one of these (CPython waits for a lock or for the GIL in pthread_cond_timedwait)...
NATIVE_WAITS = re.compile(
    r"^(pthread_cond_(timed)?wait|PyThread_acquire_lock_timed|take_gil|sem_(clock|timed)?wait|"
    r"epoll_wait|e?poll|select|(clock_)?nanosleep|futex\w*|__futex\w*) "
)
# ... or when its innermost Python frame is one of these (a lock, a condition, epoll_wait).
WAITS = re.compile(
    r"^(WorkerThread\._work \(.*/trio/_core/_thread_cache\.py"
    r"|EpollIOManager\.get_events \(.*/trio/_core/_io_epoll\.py"
    r"|(Condition|Event|Semaphore)\.wait \(.*/threading\.py"
    r"|Thread\.join \(.*/threading\.py|Thread\._wait_for_tstate_lock \(.*/threading\.py"
    r"|Queue\.get \(.*/queue\.py)\)$"
)
UNRESOLVED = re.compile(r"^0x[0-9a-f]+ ")


def _is_python(frame: str) -> bool:
    m = _FRAME_RX.match(frame)
    return bool(m) and (m["file"].endswith(".py") or m["file"].startswith("<") or "/bin/" in m["file"])


_FRAME_RX = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
# Frames nearly every sample passes through: left out of the inclusive ("cumulative") ranking.
GENERIC = re.compile(
    r"/trio/_core/|/outcome/|/threading\.py|/runpy\.py|/bin/rentahal-node|/cli\.py|/async_generator|"
    r"/contextlib\.py|/trio/_threads\.py|/typer/|/click/|^process |^thread "
)


def _norm(frame: str) -> str:
    """Give a frame's file a leading "/" (py-spy without --full-filenames shortens paths), so the
    path patterns above match either way."""
    m = _FRAME_RX.match(frame)
    if m and not m["file"].startswith(("/", "<")):
        return f"{m['func']} (/{m['file']})"
    return frame


def _short(frame: str) -> str:
    m = _FRAME_RX.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3", "/bench_base/", "/rentahal/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    return f"{m['func']} ({path.lstrip('/')})"


def _layer(stack: list[str], *, skip_plumbing: bool = False) -> str:
    for frame in reversed(stack):
        for name, rx in _LAYER_RX:
            if rx.search(frame):
                if skip_plumbing and name.startswith(PLUMBING):
                    break  # try the caller
                return name
    return "trio event loop itself (no task frame above it)" if skip_plumbing else "other"


@dataclass
class Profile:
    label: str
    seconds: float
    samples: int  # kept: not waiting
    waiting: int  # dropped: the innermost frame is a wait
    threads: Counter[str]
    self_time: Counter[str]
    inclusive: Counter[str]
    layers: Counter[str]
    components: Counter[str]
    raw: Path
    proc_cpu_s: float = float("nan")  # the process's CPU over the same seconds, from /proc
    cpu_ms_per_query: float = float("nan")  # from the measured window

    def share(self, n: int) -> str:
        return f"{100.0 * n / self.samples:.1f}%" if self.samples else "-"

    def ms(self, n: int) -> str:
        if not self.samples or math.isnan(self.cpu_ms_per_query):
            return "-"
        return f"{self.cpu_ms_per_query * n / self.samples:.2f}"


def parse_profile(label: str, raw: Path, seconds: float) -> Profile:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    components: Counter[str] = Counter()
    total = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [_norm(f) for f in stack_text.split(";")]
        head = [f for f in frames if f.startswith(("process ", "thread "))]
        stack = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not stack:
            continue
        last_py = max((i for i, f in enumerate(stack) if _is_python(f)), default=-1)
        native_tail = stack[last_py + 1 :]
        if any(NATIVE_WAITS.match(f) for f in native_tail) or (last_py >= 0 and WAITS.match(stack[last_py])):
            waiting += n
            continue
        total += n
        threads[re.sub(r"^thread \(\d+\): ", "", head[-1]) if head else "?"] += n
        leaf = next((f for f in reversed(stack) if not UNRESOLVED.match(f)), stack[-1])
        self_time[_short(leaf)] += n
        for f in {_short(f) for f in stack if _is_python(f) and not GENERIC.search(f)}:
            inclusive[f] += n
        layers[_layer(stack)] += n
        components[_layer(stack, skip_plumbing=True)] += n
    return Profile(label, seconds, total, waiting, threads, self_time, inclusive, layers, components, raw)


def profile_report(p: Profile, top: int = 20) -> str:
    busy = p.samples / (PROFILE_HZ * p.seconds) if p.seconds else 0.0
    proc = p.proc_cpu_s / p.seconds if p.seconds else float("nan")
    everything = p.samples + p.waiting
    lines = [
        (
            f"### {p.label}: {p.samples} samples kept of {everything} (all threads) in {p.seconds:.0f} s "
            f"at {PROFILE_HZ} Hz ({100.0 * p.waiting / max(everything, 1):.0f}% dropped as waits); "
            f"kept ≈ {busy:.2f} cores busy, /proc says {proc:.2f}; {p.cpu_ms_per_query:.2f} ms CPU "
            f"per query in the measured window (the ms columns split it by share); raw stacks: `{p.raw}`"
        ),
        "",
        "Threads: " + ", ".join(f"{t} {p.share(n)}" for t, n in p.threads.most_common(6)),
        "",
        "| layer (innermost known frame) | share | ms/query |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {p.share(n)} | {p.ms(n)} |" for name, n in p.layers.most_common()),
        "",
        "| component (innermost frame outside trio/stdlib plumbing) | share | ms/query |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {p.share(n)} | {p.ms(n)} |" for name, n in p.components.most_common()),
        "",
        "| self time: innermost resolved frame, native included (file) | share |",
        "| --- | ---: |",
        *(f"| `{f}` | {p.share(n)} |" for f, n in p.self_time.most_common(top)),
        "",
        "| inclusive, Python frames (trio/thread plumbing left out): function (file) | share |",
        "| --- | ---: |",
        *(f"| `{f}` | {p.share(n)} |" for f, n in p.inclusive.most_common(top)),
        "",
    ]
    return "\n".join(lines)


# --- one variant ----------------------------------------------------------------------------


@dataclass
class VariantResult:
    name: str
    settings: dict[str, str]
    clients: int
    window_s: float
    done: list[Done]
    node_cpu_s: dict[str, float]
    client_cpu_s: float
    others_cpu: str
    executors: dict[str, str]  # peer id -> E1 / E2
    profiled_qps: float | None = None
    profiles: list[Profile] = field(default_factory=list)

    @property
    def ok(self) -> list[Done]:
        return [d for d in self.done if d.code is None]

    @property
    def qps(self) -> float:
        return len(self.ok) / self.window_s

    def pct_ms(self, p: int) -> float:
        lat = sorted(d.latency_s for d in self.ok)
        if not lat:
            return float("nan")
        if len(lat) == 1:
            return lat[0] * 1000.0
        return statistics.quantiles(lat, n=100, method="inclusive")[p - 1] * 1000.0

    @property
    def failures(self) -> Counter[str]:
        return Counter(d.code for d in self.done if d.code is not None)

    @property
    def cpu_ms_per_query(self) -> dict[str, float]:
        n = len(self.ok)
        return {k: (1000.0 * v / n if n else float("nan")) for k, v in self.node_cpu_s.items()}


def _window_others(a: CpuSnap, b: CpuSnap) -> str:
    """CPU used in the window by processes other than the nodes and this script."""
    if a.machine is None or b.machine is None:
        return "unknown"
    busy = ((b.machine[0] - b.machine[1]) - (a.machine[0] - a.machine[1])) / CLK_TCK
    ours = sum(b.nodes.values()) - sum(a.nodes.values()) + b.own - a.own
    return f"{max(0.0, 100.0 * (busy - ours) / ((b.t - a.t) * (os.cpu_count() or 1))):.0f}%"


async def drive(
    url: str,
    pids: dict[str, int],
    executors: dict[str, str],
    clients: int,
    warmup: float,
    duration: float,
    fail_backoff: float,
    profile_s: float,
    profile_dir: Path | None,
) -> tuple[Load, CpuSnap, CpuSnap, float | None, list[tuple[str, Path, float]]]:
    load = Load()
    raws: list[tuple[str, Path, float]] = []  # (process, raw stacks, its /proc CPU seconds)
    profiled_qps = None
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client_loop, url, load, fail_backoff)
        await trio.sleep(warmup)
        progress(f"warmed up ({len(load.done)} queries ended); measuring {duration:g} s")
        a = CpuSnap.take(pids)
        await trio.sleep(duration)
        b = CpuSnap.take(pids)
        if profile_s > 0 and profile_dir is not None:
            served = Counter(executors.get(d.executor, "?") for d in load.window(a.t, b.t) if d.code is None)
            busiest = max(("E1", "E2"), key=lambda e: served.get(e, 0))
            progress(f"profiling the router and {busiest} with py-spy for {profile_s:g} s, same load")
            who_s = ("router", busiest)
            c0 = CpuSnap.take({w: pids[w] for w in who_s})
            async with trio.open_nursery() as spies:
                for who in who_s:
                    spies.start_soon(py_spy, pids[who], profile_s, profile_dir / f"{who}.raw.txt")
            c1 = CpuSnap.take({w: pids[w] for w in who_s})
            raws = [(w, profile_dir / f"{w}.raw.txt", c1.nodes[w] - c0.nodes[w]) for w in who_s]
            profiled_qps = len([d for d in load.window(c0.t, c1.t) if d.code is None]) / (c1.t - c0.t)
        load.stop = True
        nursery.cancel_scope.cancel()
    return load, a, b, profiled_qps, raws


def run_variant(
    name: str,
    work: Path,
    clients: int,
    warmup: float,
    duration: float,
    fail_backoff: float,
    profile_s: float,
    profile_dir: Path | None,
    logs: Path | None = None,
) -> VariantResult:
    from rentahal.scripts.federation import Federation

    settings = VARIANTS[name]
    fed = Federation(work / name)
    _on_exit.append(fed.close)
    try:
        progress(f"{name}: starting E1, E2 (serve chat) and the router R")
        e1, e2 = fed.start_many(["E1", "E2"], serve="chat", settings=settings)
        r = fed.start("R", serve="none", bootstrap=(e1.addr, e2.addr))
        for e in (e1, e2):
            r.wait_for(rf"peer {re.escape(e.peer_id)} is live \(serves: chat\)", 60)
        pids = {"router": r.proc.pid, "E1": e1.proc.pid, "E2": e2.proc.pid}  # type: ignore[union-attr]
        executors = {e1.peer_id: "E1", e2.peer_id: "E2"}
        load, a, b, profiled_qps, raws = trio.run(
            drive,
            r.ui,
            pids,
            executors,
            clients,
            warmup,
            duration,
            fail_backoff,
            profile_s,
            profile_dir,
        )
    finally:
        fed.close()
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            for n in fed.nodes:
                (logs / f"{name}-{n.name}.log").write_text("\n".join(n.lines) + "\n")
    res = VariantResult(
        name=name,
        settings=settings,
        clients=clients,
        window_s=b.t - a.t,
        done=load.window(a.t, b.t),
        node_cpu_s={k: b.nodes[k] - a.nodes[k] for k in a.nodes},
        client_cpu_s=b.own - a.own,
        others_cpu=_window_others(a, b),
        executors=executors,
        profiled_qps=profiled_qps,
    )
    for who, raw, cpu_s in raws:
        p = parse_profile(f"{who} ({name})", raw, profile_s)
        p.proc_cpu_s, p.cpu_ms_per_query = cpu_s, res.cpu_ms_per_query[who]
        res.profiles.append(p)
    fails = ", ".join(f"{k} {v}" for k, v in res.failures.most_common()) or "none"
    progress(
        f"{name}: {res.qps:.1f} q/s, p50 {_f(res.pct_ms(50))} ms, p95 {_f(res.pct_ms(95))} ms, "
        f"node CPU {_f(sum(res.cpu_ms_per_query.values()), 2)} ms/query, failures: {fails}"
    )
    return res


# --- report ---------------------------------------------------------------------------------


def _f(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _fmt_fail(c: Counter[str]) -> str:
    return ", ".join(f"`{k}` {v}" for k, v in c.most_common()) or "none"


def render(
    results: list[VariantResult],
    info: dict[str, str],
    *,
    started: _dt.datetime,
    load_before: str,
    others: str,
    elapsed: float,
    args: argparse.Namespace,
) -> str:
    rows = []
    for v in results:
        ok = v.ok
        cpu = v.cpu_ms_per_query
        by_exec = Counter(v.executors.get(d.executor, d.executor[:8]) for d in ok)
        split = " / ".join(f"{by_exec.get(e, 0)}" for e in ("E1", "E2"))
        failed_over = sum(1 for d in ok if d.failovers)
        rows.append(
            f"| {v.name} | {len(ok)} | **{v.qps:.1f}** | {_f(v.pct_ms(50))} | {_f(v.pct_ms(95))} "
            f"| {sum(v.failures.values())}: {_fmt_fail(v.failures)} | {failed_over} | {split} "
            f"| **{_f(sum(cpu.values()), 2)}** ({_f(cpu['router'], 2)} + {_f(cpu['E1'], 2)} + "
            f"{_f(cpu['E2'], 2)}); {sum(v.node_cpu_s.values()):.1f} s in all "
            f"| {_f(1000.0 * v.client_cpu_s / len(ok) if ok else float('nan'), 2)} | {v.others_cpu} |"
        )
    settings = "; ".join(
        f"**{v.name}**: " + (", ".join(f"`{k}={val}`" for k, val in v.settings.items()) or "the shipped node.toml")
        for v in results
    )
    lines = [
        SECTION_HEADING,
        "",
        "```sh",
        command_line(),
        "```",
        "",
        (
            f"Run {started.strftime('%Y-%m-%d %H:%M UTC')}: `nproc` {info['nproc']} ({info['cpu']}), "
            f"{load_before}, Python {info['python']}, py-libp2p {info['libp2p']}, "
            f"llama-cpp-python {info['llama']}, commit `{info['commit']}`; the whole run took "
            f"{elapsed:.0f} s, during which other processes used {others} of the CPUs."
        ),
        "",
        (
            f"Three node processes on loopback: a router R (`serve=none`, bootstrap E1 and E2) and "
            f"two executors E1, E2 serving chat with the 0.5 MB smoke-test model. {args.clients} "
            f"websocket clients (each its own user) submit `{json.dumps(chat_payload(TOKENS))}` to R, "
            f"one query in flight each, the next as soon as one ends (after {args.fail_backoff:g} s "
            f"if it failed); after {args.warmup:g} s of warm-up, queries ending in the next "
            f"{args.duration:g} s are counted. q/s = successful queries / window; latency = submit → "
            f"`result` of the successful ones; node CPU = utime + stime of the three processes over "
            f"the window ÷ successful queries. The client (this script) shares the same cores. "
            f"Executor settings: {settings}."
        ),
        "",
        (
            "| variant | ok | q/s | p50 ms | p95 ms | failed: by code | ok after failover "
            "| ok on E1 / E2 | node CPU ms/query (R + E1 + E2); CPU s in the window "
            "| client CPU ms/query | other procs |"
        ),
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ]
    for v in results:
        first: dict[str, str] = {}
        for d in v.done:
            if d.code is not None:
                first.setdefault(d.code, d.message)
        if first:
            lines.append(
                f"First message of each failure code ({v.name}): "
                + "; ".join(f'`{code}`: "{msg[:240]}"' for code, msg in first.items())
                + "."
            )
            lines.append("")
    for v in results:
        if v.profiles:
            lines.append(
                f"Profile ({v.name}, py-spy at {PROFILE_HZ} Hz for {args.profile:g} s after the "
                f"window, same load: {v.profiled_qps:.1f} q/s while sampling). Where a process's "
                f"CPU per query goes, by the innermost rentahal/libp2p/library component on the "
                f"stack (trio and stdlib plumbing charged to their caller), share of its non-waiting "
                f"samples and ms/query, top 6:"
            )
            lines.append("")
            lines.append("| process (ms/query) | " + " | ".join(f"#{i}" for i in range(1, 7)) + " |")
            lines.append("| --- |" + " --- |" * 6)
            for p in v.profiles:
                top = [f"{name} {p.share(n)} ({p.ms(n)})" for name, n in p.components.most_common(6)]
                top += [""] * (6 - len(top))
                lines.append(f"| {p.label.split(' ')[0]} ({p.cpu_ms_per_query:.2f}) | " + " | ".join(top) + " |")
            lines.append("")
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_throughput",
        description="Routed chat queries per second with many concurrent websocket clients "
        "(router + 2 executors, real node processes); print a markdown section.",
    )
    add = parser.add_argument
    add("--clients", type=int, default=32, help="concurrent websocket clients (default 32)")
    add("--duration", type=float, default=20.0, help="measured seconds per variant (default 20)")
    add("--warmup", type=float, default=3.0, help="seconds of load before measuring (default 3)")
    add(
        "--variants",
        default="relaxed,default",
        help=f"comma-separated, from {','.join(VARIANTS)} (default relaxed,default)",
    )
    add("--fail-backoff", type=float, default=0.25, help="seconds a client waits after a failed query (default 0.25)")
    add(
        "--profile",
        type=float,
        default=0.0,
        metavar="S",
        help="py-spy the router and the busier executor for S seconds under the relaxed load "
        "(default 0: no; needs py-spy)",
    )
    add(
        "--profile-dir",
        type=Path,
        help="where py-spy's raw stacks and summary.md go "
        "(default: a new bench_throughput-profile-* folder in the temp dir)",
    )
    add("--logs", type=Path, help="write each node's log (stderr) here, per variant")
    add("--out", type=Path, help="markdown file whose throughput section to rewrite")
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: expected names from {list(VARIANTS)}, got {args.variants!r}")
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.fail_backoff < 0 or args.profile < 0:
        parser.error("--clients >= 1, --duration > 0, --warmup, --fail-backoff and --profile >= 0")

    import logging

    logging.basicConfig(level=logging.WARNING)

    def on_sigterm(signum: int, frame: Any) -> None:
        for stop in reversed(_on_exit):
            with contextlib.suppress(Exception):
                stop()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)

    profile_dir: Path | None = None
    if args.profile > 0:
        profile_dir = args.profile_dir or Path(tempfile.mkdtemp(prefix="bench_throughput-profile-"))
        profile_dir.mkdir(parents=True, exist_ok=True)

    started = _dt.datetime.now(_dt.UTC)
    load_before = other_load()
    progress(f"before the run: {load_before}")
    cpu_start = (cpu_times(), os.times())
    t_start = time.perf_counter()
    results: list[VariantResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_throughput-") as tmp:
            for name in variants:
                profile = args.profile if name == "relaxed" else 0.0
                results.append(
                    run_variant(
                        name,
                        Path(tmp),
                        args.clients,
                        args.warmup,
                        args.duration,
                        args.fail_backoff,
                        profile,
                        profile_dir,
                        args.logs,
                    )
                )
    except (BenchError, AssertionError) as exc:
        print(f"bench_throughput: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t_start
    others = other_cpu_share(cpu_start, elapsed)

    profiles = [p for v in results for p in v.profiles]
    if profiles and profile_dir is not None:
        summary = "\n".join(profile_report(p) for p in profiles)
        (profile_dir / "summary.md").write_text(summary)
        print(summary, file=sys.stderr)
        progress(f"profile summary in {profile_dir / 'summary.md'}")

    section = render(
        results, machine_info(), started=started, load_before=load_before, others=others, elapsed=elapsed, args=args
    )
    print(section)
    if args.out:
        write_section(args.out, SECTION_HEADING, section)
        progress(f"wrote the throughput section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
