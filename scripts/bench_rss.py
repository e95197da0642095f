"""Memory of a node by what it serves: RSS after start and after queries, and which heavy native
libraries it mapped (torch, diffusers' and whisper's) — a chat-only node must map none.

    python -m rentahal.scripts.bench_rss [--serve chat] [--queries 20] [--out BENCHMARKS.md]

One real ``rentahal-node run`` process (scripts/federation.py) on the smoke-test models; RSS is
read from /proc/<pid>/status, mapped libraries from /proc/<pid>/maps. Run on demand, never in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

import trio

from .benchreport import command_line, machine_info, write_section
from .federation import Federation, NodeProcess, connect

HEADING = "## Memory of a node by what it serves"
HEAVY = re.compile(r"libtorch|libc10|_C\.cpython|whisper|libggml|libllama", re.I)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def native_libs(pid: int) -> list[str]:
    names = {
        Path(line.split()[-1]).name
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if line.endswith(".so") or ".so." in line
    }
    return sorted(n for n in names if HEAVY.search(n))


async def ask(node: NodeProcess, realm: str, n: int) -> None:
    async with connect(node.ui) as c:
        for i in range(n):
            payload = {"prompt": f"rss {i}", "max_tokens": 8} if realm == "chat" else {"prompt": f"rss {i}"}
            async for msg in c.stream("submit_query", realm=realm, stream=False, payload=payload):
                if msg["op"] in ("result", "error"):
                    break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--serve", default="chat")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        try:
            node = fed.start("rss", serve=a.serve, settings={"p2p.mdns": "false"})
            assert node.proc is not None
            pid = node.proc.pid
            started = rss_mb(pid)
            first = a.serve.split(",")[0]
            if first != "none":
                trio.run(ask, node, first, a.queries)
            rows.append((a.serve, started, rss_mb(pid), native_libs(pid)))
        finally:
            fed.close()
    info = machine_info()
    lines = [
        HEADING,
        "",
        f"Command: `{command_line()}`. Machine: {info.get('cpu', '?')}; load average {os.getloadavg()[0]:.2f}.",
        "",
        "| serves | RSS after start | RSS after queries | heavy native libraries mapped |",
        "| --- | --- | --- | --- |",
        *(f"| {s} | {r0:.1f} MB | {r1:.1f} MB | {', '.join(libs) or 'none'} |" for s, r0, r1, libs in rows),
        "",
        "Target (issue 10): a chat-only node at most 150 MB, with no torch, diffusers or whisper.cpp "
        "mapped: they are imported only by the realms that need them (imagine, speech), and a CPU-only "
        "llama.cpp build skips the GPU probe that imported torch (+225 MB, +1 s at start before).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        write_section(a.out, HEADING, text)


if __name__ == "__main__":
    main()
