"""What an idle federation costs, and how fast it notices a newcomer.

Starts N nodes on loopback (each bootstrapping off the first, serving ``--serve``), waits until
every node lists every other as live, measures each node's CPU over ``--seconds`` of idleness
(utime + stime from /proc), then starts one more node and measures how long until every node
lists it as live. Baseline in the same run: this very machine's idle load, read from /proc/stat
over the same window before the nodes start.

    python -m rentahal.scripts.bench_idle --nodes 10 --seconds 20 [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import trio

from .bench_throughput import proc_cpu_s
from .federation import Federation, NodeProcess, connect


def machine_busy_fraction(seconds: float) -> float:
    """Share of all cores busy over ``seconds`` (the machine's own load, before any node)."""

    def read() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + f[4]
        return sum(f) - idle, sum(f)

    b0, t0 = read()
    time.sleep(seconds)
    b1, t1 = read()
    return (b1 - b0) / max(t1 - t0, 1)


async def live_ids(node: NodeProcess, client) -> set[str]:
    return {p["peer_id"] for p in (await client.call("peers"))["peers"] if p["state"] == "live"}


async def wait_all_see(nodes: list[NodeProcess], want: dict[str, set[str]], timeout: float) -> list[float]:
    """Seconds until each node's live set includes ``want[node.name]`` (polled every 50 ms),
    sorted."""
    start = time.perf_counter()
    done: dict[str, float] = {}

    async def watch(node: NodeProcess) -> None:
        async with connect(node.ui) as client:
            while not want[node.name] <= await live_ids(node, client):
                await trio.sleep(0.05)
            done[node.name] = time.perf_counter() - start

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(watch, n)
    return sorted(done.values())


async def settle_checks(nodes: list[NodeProcess], quiet: float, timeout: float) -> float:
    """Seconds until no node has sent a spot-check canary for ``quiet`` seconds (the checks of
    first contact: on 2 cores, 10 nodes checking each other take a while)."""
    start = time.perf_counter()
    last: dict[str, int] = {}
    quiet_since = start
    clients = []
    async with contextlib.AsyncExitStack() as stack:
        for x in nodes:
            clients.append(await stack.enter_async_context(connect(x.ui)))
        with trio.fail_after(timeout):
            while time.perf_counter() - quiet_since < quiet:
                now = {
                    x.name: (await c.call("status"))["status"]["spot_checks"]["canaries_sent"]
                    for x, c in zip(nodes, clients, strict=False)
                }
                if now != last:
                    last, quiet_since = now, time.perf_counter()
                await trio.sleep(0.5)
    return time.perf_counter() - start - quiet


def run(n: int, seconds: float, serve: str, settle: float = 10.0) -> dict[str, object]:
    baseline = machine_busy_fraction(min(seconds, 10.0))
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        try:
            first = fed.start("n0", serve=serve)
            rest = fed.start_many([f"n{i}" for i in range(1, n)], serve=serve, bootstrap=(first.addr,))
            nodes = [first, *rest]
            ids = {x.name: x.peer_id for x in nodes}
            want = {x.name: {p for q, p in ids.items() if q != x.name} for x in nodes}
            converge = trio.run(wait_all_see, nodes, want, 120.0)[-1]
            checks_done = trio.run(settle_checks, nodes, settle, 300.0)
            cpu0 = {x.name: proc_cpu_s(x.proc.pid) for x in nodes}
            w0 = time.perf_counter()
            time.sleep(seconds)  # the measured window: nothing happens, on purpose
            wall = time.perf_counter() - w0
            idle = {x.name: (proc_cpu_s(x.proc.pid) - cpu0[x.name]) / wall for x in nodes}
            launched = time.perf_counter()
            newcomer = fed.launch(f"n{n}", serve=serve, bootstrap=(first.addr,))
            newcomer.wait_for(r"ready peer=(\S+) ui=", 60)  # its network is up
            up = time.perf_counter()
            newcomer.wait_ready()
            ready = time.perf_counter()
            new_want = {x.name: {newcomer.peer_id} for x in nodes}
            see_each = trio.run(wait_all_see, nodes, new_want, 120.0)
            see_new, seen = see_each[-1], time.perf_counter()
        finally:
            fed.close()
    shares = sorted(idle.values())
    return {
        "nodes": n,
        "serve": serve,
        "seconds": seconds,
        "settle": settle,
        "machine_busy_before": baseline,
        "converge_s": converge,
        "idle_cpu_median": statistics.median(shares),
        "idle_cpu_max": shares[-1],
        "idle_cpu_min": shares[0],
        "see_new_node_s": see_new,
        "see_new_first_s": see_each[0],
        "see_new_median_s": statistics.median(see_each),
        "checks_done_s": checks_done,
        "launch_to_seen_s": seen - launched,
        "up_to_seen_s": seen - up,
        "launch_to_ready_s": ready - launched,
    }


def report(r: dict[str, object], command: str) -> str:
    return "\n".join(
        [
            f"Command: `{command}`; machine busy before the nodes started: "
            f"{100 * float(r['machine_busy_before']):.1f} % of its cores (2).",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| idle CPU per node, median (min–max), % of one core | {100 * float(r['idle_cpu_median']):.1f} "
            f"({100 * float(r['idle_cpu_min']):.1f}–{100 * float(r['idle_cpu_max']):.1f}) |",
            f"| {r['nodes']} nodes all see each other after the last is ready | {float(r['converge_s']):.2f} s |",
            f"| first-contact spot-checks all done (the measured window starts {float(r.get('settle', 0)):g} s after) "
            f"| {float(r['checks_done_s']):.1f} s |",
            f"| every node sees a newcomer (live: a record and a connection), after its network is up "
            f"| {float(r['up_to_seen_s']):.2f} s (the first node {float(r['see_new_first_s']) + float(r['up_to_seen_s']) - float(r['see_new_node_s']):.2f} s, "  # noqa: E501
            f"the median {float(r['see_new_median_s']) + float(r['up_to_seen_s']) - float(r['see_new_node_s']):.2f} s) |",  # noqa: E501
            f"| the same, from the newcomer's process start (Python start-up and imports included; "
            f"its model ready at {float(r['launch_to_ready_s']):.2f} s) | {float(r['launch_to_seen_s']):.2f} s |",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--serve", default="chat")
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds without a spot-check canary anywhere before the measured window",
    )
    ap.add_argument("--out", help="append the result to this markdown file")
    a = ap.parse_args()
    r = run(a.nodes, a.seconds, a.serve, a.settle)
    text = report(
        r,
        f"python -m rentahal.scripts.bench_idle --nodes {a.nodes} --seconds {a.seconds:g} --serve {a.serve} --settle {a.settle:g}",  # noqa: E501
    )
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
