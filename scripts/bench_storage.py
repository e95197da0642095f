"""Sharded write throughput of node storage: 1 shard against 4, with concurrent writers.

    python -m rentahal.scripts.bench_storage [--writers 8] [--rows 2000] [--repeat 5]
                                             [--result-kb 0,64] [--out BENCHMARKS.md]

Each writer (a trio task with its own users) stores a query and then its result, as the node
does: `insert_query` then `finish_query`, two write transactions per row. Both layouts run in
this one process, alternating, on fresh data dirs; the table shows the median of the repeats,
once per result size (a chat answer, or an answer carrying that many KiB of binary media).
With --out, only the `## Sharded write throughput` section of that file is replaced.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from rentahal.node.storage import Storage
from rentahal.scripts import benchreport
from rentahal.scripts.benchreport import git_commit

SECTION = "## Sharded write throughput"
LAYOUTS = (1, 4)


async def one_run(data_dir: Path, shards: int, writers: int, rows: int, result_kb: int) -> float:
    """Seconds for `writers` tasks to insert and finish `rows` queries in all."""
    st = await Storage.open(data_dir, shards)
    payload = {"prompt": "tell me a story " * 16, "max_tokens": 256, "temperature": 0.7}
    output = {"text": "once upon a time " * 40, "media": os.urandom(result_kb * 1024)}

    async def writer(w: int, n: int) -> None:
        for k in range(n):
            qid, guid = f"q-{w}-{k}", f"user-{w}-{k % 16}"
            await st.insert_query(
                query_id=qid,
                user_guid=guid,
                realm="chat",
                payload=payload,
                priority=0,
                deadline_at=time.time() + 60,
            )
            await st.finish_query(
                qid,
                guid,
                output=output,
                stats={"tokens": 256},
                executor="local",
                failovers=[],
                processing_ms=12.5,
                cost=0.001,
            )

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, w, rows // writers + (w < rows % writers))
    elapsed = time.perf_counter() - start
    await st.aclose()
    return elapsed


async def measure(args: argparse.Namespace) -> dict[tuple[int, int], list[float]]:
    """Seconds per run, by (result KiB, shards)."""
    times: dict[tuple[int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        for kb in args.result_kb:
            for r in range(args.repeat):
                for shards in LAYOUTS:
                    data_dir = Path(tmp) / f"run-{kb}-{r}-{shards}"
                    t = await one_run(data_dir, shards, args.writers, args.rows, kb)
                    times.setdefault((kb, shards), []).append(t)
    return times


def report(args: argparse.Namespace, times: dict[tuple[int, int], list[float]]) -> str:
    kbs = ",".join(map(str, args.result_kb))
    cmd = (
        f"python -m rentahal.scripts.bench_storage --writers {args.writers} --rows {args.rows} "
        f"--repeat {args.repeat} --result-kb {kbs}" + (f" --out {args.out}" if args.out else "")
    )
    lines = [
        SECTION,
        "",
        f"`{cmd}`",
        "",
        (
            f"{datetime.datetime.now().astimezone().date()}, commit {git_commit()}, "
            f"nproc {os.cpu_count()}, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}."
        ),
        (
            f"{args.writers} concurrent writers (trio tasks in one process, each with its own "
            "users) store queries and then their results (`insert_query` + `finish_query`: two "
            "write transactions per row); WAL, `synchronous=NORMAL`, data dirs in the system "
            f"temp dir. Median of {args.repeat} alternating runs (all runs in brackets)."
        ),
        "",
        "| result | shards | rows | seconds (runs) | rows/s | 4-shard / 1-shard |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for kb in args.result_kb:
        rate = {n: args.rows / statistics.median(times[kb, n]) for n in LAYOUTS}
        for n in LAYOUTS:
            ts = times[kb, n]
            runs = ", ".join(f"{t:.2f}" for t in ts)
            ratio = f"**{rate[4] / rate[1]:.2f}x**" if n == 4 else ""
            result = "0.7 KB text" + (f" + {kb} KiB media" if kb else "")
            lines.append(
                f"| {result} | {n} | {args.rows} | {statistics.median(ts):.2f} ({runs}) | {rate[n]:,.0f} | {ratio} |"
            )
    return "\n".join([*lines, ""])


def write_section(path: Path, section: str) -> None:
    benchreport.write_section(path, SECTION, section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000, help="queries per layout and run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--result-kb",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 64],
        help="comma-separated sizes of binary media per result, in KiB (default 0,64)",
    )
    parser.add_argument("--out", type=Path, help="markdown file whose section to replace")
    args = parser.parse_args(argv)
    if args.writers < 1 or args.rows < args.writers or args.repeat < 1:
        parser.error("need --writers >= 1, --rows >= --writers and --repeat >= 1")
    section = report(args, trio.run(measure, args))
    print(section)
    if args.out:
        write_section(args.out, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
