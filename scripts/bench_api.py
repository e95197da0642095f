"""The OpenAI-compatible API's cost: one chat request five ways, in one run.

    python -m rentahal.scripts.bench_api [--tokens 256] [--n 7] [--out BENCHMARKS.md]

Node B serves chat with the smoke-test model (seeded into its data dir, one thread), node A
routes only (bootstrapped from B). The same request (the prompt "hello", ``--tokens`` tokens
with end-of-sequence masked, a fixed seed per round) is made:

(a) directly with llama-cpp-python in this process (``Llama.create_chat_completion``, streamed,
    one thread, the same GGUF): the floor;
(b) on B's websocket (the node's own JSON protocol, tokens streamed);
(c) on B's ``/v1/chat/completions`` (server-sent events, as an OpenAI client does);
(d) on A's websocket: A routes it to B over libp2p;
(e) on A's ``/v1/chat/completions``: the same through the API.

The five take turns request by request after one untimed warm-up each, so the machine's drift
hits all alike. Wall time is the client's, from sending the request to the last byte of the
answer; time to first token likewise; tokens/s is the answer's tokens over the wall time. The
table shows medians. Prints a markdown section; with --out it replaces that section of the
file. Run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from .bench_realms import BenchError, chat_payload, progress, with_pair
from .benchreport import command_line, cpu_times, machine_info, other_cpu_share, write_section

SECTION = "## The OpenAI-compatible API: latency and tokens/s beside the websocket and llama-cpp-python"
PATHS = {
    "llama": "(a) llama-cpp-python directly, in process",
    "ws": "(b) websocket → node B",
    "api": "(c) /v1/chat/completions → node B",
    "ws_routed": "(d) websocket → router A → B over libp2p",
    "api_routed": "(e) /v1/chat/completions → router A → B",
}
Sample = tuple[float, float, int]  # (wall s, first token s, tokens)
Runner = Callable[[int], Awaitable[Sample]]


def llama_runner(model: Path, tokens: int) -> Runner:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=max(4096, tokens + 64), n_threads=1, verbose=False)
    eos = llm.token_eos()

    def no_eos(_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    def one_sync(seed: int) -> Sample:
        t0 = time.perf_counter()
        first = None
        pieces = 0
        for chunk in llm.create_chat_completion(
            messages=[{"role": "user", "content": "hello"}], max_tokens=tokens, temperature=0.7, seed=seed,
            stream=True, logits_processor=llama_cpp.LogitsProcessorList([no_eos]),
        ):  # fmt: skip
            if chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        return wall, first if first is not None else wall, pieces

    async def one(seed: int) -> Sample:
        return await trio.to_thread.run_sync(one_sync, seed)

    return one


def ws_runner(client: Any, tokens: int) -> Runner:
    async def one(seed: int) -> Sample:
        t0 = time.perf_counter()
        first = None
        async for msg in client.stream("submit_query", realm="chat", payload=chat_payload(tokens, seed)):
            if msg["op"] == "event" and msg["event"]["type"] == "token" and first is None:
                first = time.perf_counter() - t0
            elif msg["op"] == "result":
                wall = time.perf_counter() - t0
                return wall, first if first is not None else wall, int(msg["result"]["stats"]["tokens"])
            elif msg["op"] == "error":
                raise BenchError(f"websocket query failed: {msg['code']}: {msg['message']}")
        raise BenchError("websocket query: no result")

    return one


def api_runner(http: httpx.AsyncClient, base: str, tokens: int) -> Runner:
    async def one(seed: int) -> Sample:
        body = {
            "model": "any", "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens,
            "temperature": 0.7, "seed": seed, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
        }  # fmt: skip
        t0 = time.perf_counter()
        first = None
        used = 0
        async with http.stream("POST", f"{base}/chat/completions", json=body) as answer:
            if answer.status_code != 200:
                raise BenchError(f"API answered {answer.status_code}: {(await answer.aread())[:300]!r}")
            async for line in answer.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    used = int(chunk["usage"]["completion_tokens"])
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        return wall, first if first is not None else wall, used

    return one


async def measure(runners: dict[str, Runner], n: int) -> dict[str, list[Sample]]:
    for run in runners.values():  # warm-up, seed 0
        with trio.fail_after(300):
            await run(0)
    out: dict[str, list[Sample]] = {p: [] for p in runners}
    for i in range(1, n + 1):
        for path, run in runners.items():
            with trio.fail_after(300):
                out[path].append(await run(i))
        progress(f"round {i}/{n}: " + ", ".join(f"{p} {out[p][-1][0] * 1000:.0f} ms" for p in runners))
    return out


async def _measure(model: Path, a: Any, b: Any, tokens: int, n: int) -> dict[str, list[Sample]]:
    from .federation import connect

    def api(node: Any) -> str:
        return node.ui.replace("ws://", "http://").rstrip("/") + "/v1"

    async with (
        connect(b.ui, guid=uuid.uuid4().hex) as to_b,
        connect(a.ui, guid=uuid.uuid4().hex) as to_a,
        httpx.AsyncClient(timeout=300, trust_env=False) as http,
    ):
        runners = {
            "llama": llama_runner(model, tokens),
            "ws": ws_runner(to_b, tokens),
            "api": api_runner(http, api(b), tokens),
            "ws_routed": ws_runner(to_a, tokens),
            "api_routed": api_runner(http, api(a), tokens),
        }
        return await measure(runners, n)


def report(results: dict[str, list[Sample]], tokens: int, n: int, started: str, elapsed: float, others: str) -> str:
    info = machine_info()
    base_wall = statistics.median(s[0] for s in results["llama"])
    lines = [
        SECTION,
        "",
        f"Command: `{command_line()}`  ",
        f"Run: {started}, {elapsed:.0f} s; {info['nproc']} cores ({info['cpu']}), Python {info['python']}, "
        f"llama-cpp-python {info['llama']}, commit {info['commit']}; other processes used {others} of the "
        "machine meanwhile.",
        "",
        f"One chat request of {tokens} tokens (smoke-test model, one thread, end-of-sequence masked), "
        f"median of {n} rounds; the five paths take turns request by request.",
        "",
        "| path | wall ms | first token ms | tokens/s | wall vs (a) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for path, label in PATHS.items():
        samples = results[path]
        wall = statistics.median(s[0] for s in samples)
        first = statistics.median(s[1] for s in samples)
        rate = statistics.median(s[2] / s[0] for s in samples)
        lines.append(f"| {label} | {wall * 1000:.1f} | {first * 1000:.1f} | {rate:.0f} | ×{wall / base_wall:.2f} |")
    api_over = statistics.median(s[0] for s in results["api"]) - statistics.median(s[0] for s in results["ws"])
    ws = [s[0] for s in results["ws"]]
    spread = statistics.median(abs(w - statistics.median(ws)) for w in ws)
    lines += [
        "",
        f"The API path costs {api_over * 1000:+.1f} ms per request against the websocket to the same node "
        f"(one request's wall time varies by ±{spread * 1000:.0f} ms here, the median absolute deviation "
        "of (b): a difference smaller than that is noise) "
        "(HTTP head and body parsed by h11, one server-sent event per token batch, one connection per "
        "request as OpenAI clients make them). Both node paths store the query before routing it and "
        "the answer after; that, and the token events, is what separates (b) from (a).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from rentahal.models.smoke.tiny_llama import write_tiny_llama

    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu0 = (cpu_times(), os.times())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_api-") as tmp:
        work = Path(tmp)
        model = write_tiny_llama(work / "tiny.gguf")
        ctx = str(max(4096, args.tokens + 64))
        settings = {"realms.chat.threads": "1", "realms.chat.max_tokens": ctx, "realms.chat.n_ctx": ctx}
        results = with_pair(
            work, "chat", settings, (model, "chat.gguf"),
            lambda a, b: trio.run(_measure, model, a, b, args.tokens, args.n),
        )  # fmt: skip
    elapsed = time.perf_counter() - t0
    text = report(results, args.tokens, args.n, started, elapsed, other_cpu_share(cpu0, elapsed))
    print(text)
    if args.out:
        write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
