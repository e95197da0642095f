"""Realm throughput: the chat and imagine backends called directly, against the same requests
sent through a node's websocket and through a router node over libp2p, all in one run.

    python -m rentahal.scripts.bench_realms [--tokens 256] [--n 5] [--images 10]
                                            [--out BENCHMARKS.md]

Everything runs on the CPU with the smoke-test models (the tiny random-weight llama GGUF and the
tiny diffusers pipeline, written with the same seeds the node uses for its own), one thread per
backend. For each realm three paths are measured:

(a) the backend (`ChatBackend` / `ImagineBackend`) called in this process, its events going to a
    sink that only counts them;
(b) the same payload submitted to node B (which serves the realm) on B's own websocket, tokens
    streamed to the client (the default, `stream=True`);
(c) the same payload submitted to node A (`--serve none`, bootstrapped from B), so the query and
    every event travel A -> B -> A over `/rentahal/query/2.0.0` (libp2p, Noise, Yamux).

Both nodes stay up while a realm is measured, and the three paths take turns request by request
(a, b, c, a, b, c, ...) after one untimed warm-up request each, so drift in the machine's load
hits all three alike. A request's time is the client's wall time from submit to its result;
chat tokens/s is the tokens the result reports (`stats.tokens`, = max_tokens with ignore_eos)
over that time, images/s is 1 over it; the table shows the median of the runs.

B's data dir is seeded with the smoke-test model files before B starts (the same files, with the
same seed, that B would write itself), as for a node whose model is already in place. A node that
writes its smoke-test diffusers pipeline at start-up does so with torch in a trio worker thread
before it applies `realms.imagine.threads`; torch keeps a thread count per OS thread, so that
worker, which later runs the generations, goes on using every core (measured on 2 cores while
writing this benchmark: 1.95 cores busy and 131 ms per image with `realms.imagine.threads=1`,
against 0.93 and 191 ms with the model already there), and the comparison with the one-thread
direct path would be unfair.

Prints a markdown section; with --out it also replaces that section of the file (from its
heading to the next `## ` heading or the end), leaving every other section as it was.
Benchmarks are run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
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
from rentahal.scripts.benchreport import (
    run_cmd as _run,
)

SECTION = "## Realm throughput: through the node vs the backend directly"
REQUEST_TIMEOUT = 300.0
PATHS = ("direct", "node", "routed")
PATH_LABEL = {
    "direct": "(a) backend called directly, in process",
    "node": "(b) websocket → node B",
    "routed": "(c) websocket → router A → B over libp2p",
}


class BenchError(Exception):
    """The benchmark could not measure what it set out to; the message says why."""


def progress(msg: str) -> None:
    print(f"[bench_realms] {msg}", file=sys.stderr, flush=True)


# --- one request, three ways ----------------------------------------------------------------


@dataclass
class Sample:
    wall_s: float  # submit -> result, as the client saw it
    units: int  # tokens (chat) or images (imagine) in the result
    first_s: float  # submit -> first token (chat) / first denoising step (imagine)
    backend_ms: float  # the backend's own generate() time, as it reports it (stats.ms)
    events: int  # token or denoising-progress events the client received
    cpu_s: float  # CPU time of the executing process (this one, or B) during the request
    all_cpu_s: float  # CPU time of this process, A and B together during the request
    executor: str  # "" for the direct path
    digest: bytes  # the answer (text or PNG), to check that all paths produced the same one

    @property
    def rate(self) -> float:
        return self.units / self.wall_s


@dataclass
class Case:
    path: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    @property
    def cores(self) -> float:
        """CPU time of the executing process over the wall time, summed over the runs."""
        return sum(s.cpu_s for s in self.samples) / sum(s.wall_s for s in self.samples)

    @property
    def cpu_ms(self) -> float:
        """Mean CPU time of the executing process per request, ms."""
        return 1000 * sum(s.cpu_s for s in self.samples) / len(self.samples)

    @property
    def all_cores(self) -> float:
        """CPU time of this process, A and B over the wall time, summed over the runs."""
        return sum(s.all_cpu_s for s in self.samples) / sum(s.wall_s for s in self.samples)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat_payload(tokens: int, seed: int) -> dict[str, Any]:
    return {
        "prompt": "hello",
        "max_tokens": tokens,
        "ignore_eos": True,
        "seed": seed,
        "temperature": 0.7,
    }


def imagine_payload(seed: int) -> dict[str, Any]:
    return {"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": seed}


def _is_step(kind: str, event: dict[str, Any]) -> bool:
    """The event that marks progress of the work: a token, or a denoising step."""
    if kind == "chat":
        return event.get("type") == "token"
    return event.get("type") == "progress" and event.get("stage") == "denoising"


def _answer(realm: str, output: dict[str, Any]) -> bytes:
    if realm == "chat":
        return str(output["text"]).encode()
    image = output["image"]
    return base64.b64decode(image["$bytes"]) if isinstance(image, dict) else bytes(image)


def all_cpu_s(pids: tuple[int, ...]) -> float:
    return time.process_time() + sum(process_cpu_s(pid) for pid in pids)


Runner = Callable[[dict[str, Any]], Awaitable[Sample]]


def direct_runner(realm: str, backend: Any, pids: tuple[int, ...]) -> Runner:
    from rentahal.models.base import Progress, Token

    async def one(payload: dict[str, Any]) -> Sample:
        events = 0
        first: float | None = None

        async def sink(ev: Any) -> None:
            nonlocal events, first
            step = isinstance(ev, Progress) and ev.stage == "denoising"
            if isinstance(ev, Token) or step:
                events += 1
                if first is None:
                    first = time.perf_counter() - t0

        all0 = all_cpu_s(pids)
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = await backend.generate(payload, sink)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        all_cpu = all_cpu_s(pids) - all0
        units = int(res.stats["tokens"]) if realm == "chat" else 1
        return Sample(
            wall,
            units,
            first if first is not None else wall,
            float(res.stats["ms"]),
            events,
            cpu,
            all_cpu,
            "",
            _answer(realm, res.output),
        )

    return one


def node_runner(realm: str, client: Any, pids: tuple[int, ...]) -> Runner:
    b_pid = pids[0]

    async def one(payload: dict[str, Any]) -> Sample:
        events = 0
        first: float | None = None
        all0 = all_cpu_s(pids)
        c0 = process_cpu_s(b_pid)
        t0 = time.perf_counter()
        async for msg in client.stream("submit_query", realm=realm, payload=payload):
            if msg["op"] == "event" and _is_step(realm, msg["event"]):
                events += 1
                if first is None:
                    first = time.perf_counter() - t0
            elif msg["op"] == "result":
                wall = time.perf_counter() - t0
                cpu = process_cpu_s(b_pid) - c0
                all_cpu = all_cpu_s(pids) - all0
                res = msg["result"]
                units = int(res["stats"]["tokens"]) if realm == "chat" else 1
                return Sample(
                    wall,
                    units,
                    first if first is not None else wall,
                    float(res["stats"]["ms"]),
                    events,
                    cpu,
                    all_cpu,
                    res["executor"],
                    _answer(realm, res["output"]),
                )
            elif msg["op"] == "error":
                raise BenchError(f"{realm} query failed: {msg.get('code')}: {msg.get('message')}")
        raise BenchError(f"{realm} query: the stream ended without a result")

    return one


async def measure(
    realm: str,
    runners: dict[str, Runner],
    payload: Callable[[int], dict[str, Any]],
    n: int,
) -> dict[str, Case]:
    """One warm-up per path (seed 0), then ``n`` rounds of a, b, c with seeds 1..n."""
    for path in PATHS:
        with trio.fail_after(REQUEST_TIMEOUT):
            await runners[path](payload(0))
    cases = {path: Case(path) for path in PATHS}
    for i in range(1, n + 1):
        for path in PATHS:
            with trio.fail_after(REQUEST_TIMEOUT):
                cases[path].samples.append(await runners[path](payload(i)))
        progress(
            f"{realm} round {i}/{n}: " + ", ".join(f"{p} {cases[p].samples[-1].wall_s * 1000:.1f} ms" for p in PATHS)
        )
    return cases


# --- the realms ----------------------------------------------------------------------------


async def _three_ways(
    realm: str, backend: Any, b: Any, a: Any, payload: Callable[[int], dict[str, Any]], n: int
) -> dict[str, Case]:
    """The same payloads three ways: the backend directly, B's own websocket, and via A."""
    from rentahal.scripts.federation import connect

    pids = (b.proc.pid, a.proc.pid)
    async with (
        connect(b.ui, guid=uuid.uuid4().hex) as to_b,
        connect(a.ui, guid=uuid.uuid4().hex) as to_a,
    ):
        runners = {
            "direct": direct_runner(realm, backend, pids),
            "node": node_runner(realm, to_b, pids),
            "routed": node_runner(realm, to_a, pids),
        }
        return await measure(realm, runners, payload, n)


async def _measure_chat(model: Path, b: Any, a: Any, tokens: int, n: int) -> dict[str, Case]:
    from rentahal.models.chat import ChatBackend

    n_ctx = max(4096, tokens + 64)
    backend = ChatBackend(model, n_ctx=n_ctx, threads=1, max_tokens_cap=n_ctx)
    await backend.load()
    try:
        return await _three_ways("chat", backend, b, a, lambda seed: chat_payload(tokens, seed), n)
    finally:
        await backend.aclose()


async def _measure_imagine(pipeline: Path, b: Any, a: Any, n: int) -> dict[str, Case]:
    import torch

    from rentahal.models.imagine import ImagineBackend

    torch.set_num_threads(1)
    backend = ImagineBackend(pipeline)
    await backend.load()
    try:
        return await _three_ways("imagine", backend, b, a, imagine_payload, n)
    finally:
        await backend.aclose()


def with_pair(
    work: Path,
    realm: str,
    settings: dict[str, str],
    seed_model: tuple[Path, str],
    body: Callable[[Any, Any], Any],
) -> Any:
    """Start B (serves ``realm``) and A (serves nothing, bootstrap B); ``body(a, b)``; stop both.

    ``seed_model`` (a smoke-test model file or folder, and its name under the node's
    ``models/smoke-test``) is copied into B's data dir first: see the module docstring."""
    from rentahal.node.executor import SMOKE_DIR
    from rentahal.scripts.federation import Federation

    src, name = seed_model
    dest = work / realm / "B" / "models" / SMOKE_DIR / name
    dest.parent.mkdir(parents=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    fed = Federation(work / realm)
    try:
        progress(f"{realm}: starting node B (serves {realm}) and router node A")
        b = fed.start("B", serve=realm, settings=settings)
        b.wait_for(rf"{realm}: serving ", 1)  # wait_ready saw "serving" or "not served"
        if any("wrote the smoke-test model" in line for line in b.lines):
            raise BenchError(f"{realm}: B wrote its own smoke-test model, not the seeded one")
        a = fed.start("A", serve="none", bootstrap=(b.addr,))
        a.wait_for(rf"peer {re.escape(b.peer_id)} is live \(serves: {realm}\)", 60)
        return body(a, b)
    finally:
        fed.close()


def check_executors(realm: str, cases: dict[str, Case], b_peer: str) -> None:
    """B answers its own queries as "local", A's by its peer ID: no other executor, no failover."""
    for path, expected in (("node", "local"), ("routed", b_peer)):
        execs = {s.executor for s in cases[path].samples}
        if execs != {expected}:
            raise BenchError(f"{realm} {path}: answered by {execs}, expected only {expected}")


# --- report --------------------------------------------------------------------------------


def competing() -> str:
    """Other test runs or nodes on the machine (they would skew every figure)."""
    found = []
    for pattern in ("pytest", "rentahal-node run"):
        out = _run("pgrep", "-f", pattern)
        pids = [p for p in out.split() if p.isdigit() and int(p) != os.getpid()]
        if pids:
            found.append(f"{len(pids)} `{pattern}` process(es)")
    return ", ".join(found) or "none"


@dataclass
class Results:
    tokens: int
    n: int
    images: int
    chat: dict[str, Case]
    imagine: dict[str, Case]
    started: _dt.datetime
    elapsed_s: float
    others_cpu: str
    competing_before: str
    competing_after: str


def _same(cases: dict[str, Case]) -> bool:
    """Did every path give the same answer for the same seed?"""
    per_path = [[s.digest for s in cases[p].samples] for p in PATHS]
    return all(x == per_path[0] for x in per_path[1:])


def _rows(realm: str, cases: dict[str, Case], unit: str, fmt: str) -> list[str]:
    direct = cases["direct"].median("rate")
    rows = []
    for path in PATHS:
        c = cases[path]
        rates = ", ".join(format(s.rate, fmt) for s in c.samples)
        rate = c.median("rate")
        ratio = "1.00" if path == "direct" else f"**{rate / direct:.2f}**"
        rows.append(
            f"| {realm} | {PATH_LABEL[path]} | {len(c.samples)} "
            f"| {format(rate, fmt)} {unit} ({rates}) | {ratio} "
            f"| {c.median('wall_s') * 1000:.1f} | {c.median('first_s') * 1000:.1f} "
            f"| {c.median('backend_ms'):.1f} | {c.cores:.2f} | {c.all_cores:.2f} "
            f"| {c.median('events'):.0f} |"
        )
    return rows


def render(r: Results, info: dict[str, str]) -> str:
    ch, im = r.chat, r.imagine
    T = r.tokens

    def ms(cases: dict[str, Case], path: str, attr: str) -> float:
        v = cases[path].median(attr)
        return v * 1000 if attr.endswith("_s") else v

    chat_gen = {p: ms(ch, p, "backend_ms") for p in PATHS}
    chat_wall = {p: ms(ch, p, "wall_s") for p in PATHS}
    extra = {p: chat_wall[p] - chat_wall["direct"] for p in PATHS}  # ms a request gains
    inside = {p: chat_gen[p] - chat_gen["direct"] for p in PATHS}  # of which inside generate()
    b_cpu = {p: ch[p].cpu_ms - ch["direct"].cpu_ms for p in PATHS}  # the executor's extra CPU
    im_wall = {p: ms(im, p, "wall_s") for p in PATHS}
    im_extra = {p: im_wall[p] - im_wall["direct"] for p in PATHS}
    png_kb = statistics.median(len(s.digest) for s in im["direct"].samples) * 4 / 3 / 1000

    same = []
    for realm, cases in (("chat", ch), ("imagine", im)):
        same.append(f"{realm}: {'identical' if _same(cases) else 'NOT identical'}")
    noisy = r.competing_before != "none" or r.competing_after != "none"

    chat_json = f'{{"prompt": "hello", "max_tokens": {T}, "ignore_eos": true, "seed": i, "temperature": 0.7}}'
    imagine_json = '{"prompt": "a cat", "width": 64, "height": 64, "steps": 4, "seed": i}'
    fixed = {p: extra[p] - inside[p] for p in PATHS}
    if b_cpu["routed"] >= 0.6 * inside["routed"]:
        why = (
            "so that time is mostly the node's own Python work per event (on the event loop, "
            "sharing the GIL with the generating thread), not idle waiting"
        )
    else:
        why = (
            f"so much of that time is waiting (client, A and B together keep "
            f"{ch['routed'].all_cores:.2f} of {info['nproc']} cores busy)"
        )
    lines = [
        SECTION,
        "",
        "```sh",
        command_line(),
        "```",
        "",
        f"Run {r.started.strftime('%Y-%m-%d %H:%M UTC')}, commit `{info['commit']}`, "
        f"`nproc` {info['nproc']} ({info['cpu']}), Python {info['python']}, "
        f"llama-cpp-python {info['llama']}, torch {info['torch']}, "
        f"diffusers {info['diffusers']}, py-libp2p {info['libp2p']}. "
        f"The run took {r.elapsed_s:.0f} s; other processes used {r.others_cpu} of the CPUs "
        f"meanwhile; other test runs or nodes on the machine: {r.competing_before} at the start, "
        f"{r.competing_after} at the end" + (" (**the figures are skewed by them**)." if noisy else "."),
        "",
        f"All on the CPU with the smoke-test models, one thread per backend (`threads=1` / "
        f"`realms.<realm>.threads=1`, `torch.set_num_threads(1)`). Chat: `{chat_json}` on the "
        f"0.5 MB tiny llama GGUF (node B with `realms.chat.max_tokens` and `n_ctx` 4096), tokens "
        f"streamed to the client. Imagine: `{imagine_json}` on the tiny diffusers pipeline "
        f'(a 64×64 PNG back as `{{"$bytes": base64}}`). Both nodes are up while a realm is '
        f"measured; after one untimed warm-up per path, the paths take turns request by request, "
        f"one request in flight, seeds 1..n. Rate = tokens in the result (or 1 image) ÷ the "
        f"client's wall time from submit to result; the median of the runs (every run in "
        f"brackets). Same answers on all three paths for the same seed: {'; '.join(same)}. "
        f"B's data dir gets the smoke-test model files before B starts (a node that writes its "
        f"diffusers pipeline at start-up generates on every core despite "
        f"`realms.imagine.threads=1`: see the script's docstring). Executor's CPU ÷ wall: CPU "
        f"time of the process that ran the backend (this one for (a), B otherwise; event loop "
        f"included) over the requests' wall time, all runs; all three: this client, A and B "
        f"together.",
        "",
        "| realm | path | runs | rate, median (runs) | ÷ direct | wall ms "
        "| to first token / step, ms | backend's own `generate()` ms | executor's CPU ÷ wall "
        "| all three processes' CPU ÷ wall | token / step events |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *_rows("chat", ch, "tokens/s", ",.0f"),
        *_rows("imagine", im, "images/s", ".2f"),
        "",
        f"Where the overhead comes from: a {T}-token chat request gains {extra['node']:.1f} ms "
        f"through B and {extra['routed']:.1f} ms routed, {inside['node']:.1f} / "
        f"{inside['routed']:.1f} ms of it inside B's `generate()` "
        f"({inside['node'] * 1000 / T:.0f} / {inside['routed'] * 1000 / T:.0f} µs per token), "
        f"while the worker thread samples on without waiting for the node: tokens that pile up "
        f"while the node publishes go out as one event ({ch['node'].median('events'):.0f} / "
        f"{ch['routed'].median('events'):.0f} token events for {T} tokens), and each event is "
        f"Python work on B's event loop (a JSON websocket message; routed, first a msgpack frame "
        f"on the Noise/yamux stream that A decodes and re-publishes) that shares the GIL and the "
        f"{info['nproc']} cores with the generating thread; "
        f"B's process spends {b_cpu['node']:.1f} / {b_cpu['routed']:.1f} ms more CPU per request "
        f"than the direct call, {why}; the rest ({fixed['node']:.1f} / {fixed['routed']:.1f} ms) "
        f"is the fixed cost of a query: stored in SQLite before it runs and its result after, "
        f"queue admission, routing and, routed, a new libp2p stream. "
        f"Imagine sends only 4 progress events per image, so it pays mostly that fixed cost plus "
        f"the PNG ({png_kb:.1f} KB of base64 in JSON): {im_extra['node']:+.1f} ms through B and "
        f"{im_extra['routed']:+.1f} ms routed on a {im_wall['direct']:.0f} ms image. "
        f"The smoke-test models are so fast that these ratios are a worst case: the routed chat "
        f"overhead is {extra['routed'] * 1000 / T:.0f} µs per token, which would be "
        f"{extra['routed'] / T / 50 * 100:.1f}% of a real model's 50 ms per token (20 tokens/s) "
        f"if it stayed the same.",
        "",
    ]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------


def run_benchmark(tokens: int, n: int, images: int) -> Results:
    from rentahal.models.smoke.tiny_diffusers import write_tiny_pipeline
    from rentahal.models.smoke.tiny_llama import write_tiny_llama

    started = _dt.datetime.now(_dt.UTC)
    competing_before = competing()
    if competing_before != "none":
        progress(f"warning: {competing_before} running: figures will be skewed")
    cpu_start = (_cpu_times(), os.times())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_realms-") as tmp:
        work = Path(tmp)
        # The same files a node writes into its data dir for its smoke-test models (seed 0).
        model = write_tiny_llama(work / "tiny.gguf")
        pipeline = write_tiny_pipeline(work / "tiny-pipeline")

        chat_settings = {
            "realms.chat.threads": "1",
            "realms.chat.max_tokens": str(max(4096, tokens + 64)),
            "realms.chat.n_ctx": str(max(4096, tokens + 64)),
        }

        def chat_body(a: Any, b: Any) -> dict[str, Case]:
            cases = trio.run(_measure_chat, model, b, a, tokens, n)
            check_executors("chat", cases, b.peer_id)
            return cases

        chat = with_pair(work, "chat", chat_settings, (model, "chat.gguf"), chat_body)

        def imagine_body(a: Any, b: Any) -> dict[str, Case]:
            cases = trio.run(_measure_imagine, pipeline, b, a, images)
            check_executors("imagine", cases, b.peer_id)
            return cases

        imagine = with_pair(work, "imagine", {"realms.imagine.threads": "1"}, (pipeline, "imagine"), imagine_body)
    elapsed = time.perf_counter() - t_start
    return Results(
        tokens=tokens,
        n=n,
        images=images,
        chat=chat,
        imagine=imagine,
        started=started,
        elapsed_s=elapsed,
        others_cpu=other_cpu_share(cpu_start, elapsed),
        competing_before=competing_before,
        competing_after=competing(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_realms",
        description="Chat tokens/s and imagine images/s: the backend direct, through a node, "
        "and routed through a second node.",
    )
    add = parser.add_argument
    add("--tokens", type=int, default=256, help="tokens per chat request (default 256)")
    add("--n", type=int, default=5, help="timed chat requests per path (default 5)")
    add("--images", type=int, default=10, help="timed images per path (default 10)")
    add("--out", type=Path, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.n < 1 or args.images < 1:
        parser.error("--tokens, --n and --images must be >= 1")

    import logging

    logging.basicConfig(level=logging.WARNING)
    try:
        results = run_benchmark(args.tokens, args.n, args.images)
    except BenchError as exc:
        print(f"bench_realms: {exc}", file=sys.stderr)
        return 1
    section = render(results, machine_info())
    print(section)
    if args.out:
        write_section(args.out, SECTION, section)
        progress(f"wrote the section to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
