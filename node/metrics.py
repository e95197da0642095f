"""Prometheus metrics: ``GET /metrics`` on the UI port, written by prometheus_client.

Two kinds. Events are counted as they happen, by the code they happen in: queries this node's
users asked (by realm, outcome and the kind of executor that answered: ``local``, ``peer``, or
``none`` when none did), their latency and time to first token, tokens and images served,
failovers by cause, queries executed here (for this node's users or for peers), rate-limit
refusals, API errors. Levels are read when Prometheus scrapes, from the node's own state
(:class:`NodeCollector`): queue depth and running queries per realm, peers by state, gossip,
DHT and relay counters; and the process's RSS and open files (prometheus_client's own
process collector). Every node has its own registry: several nodes in one process (tests) never
share a count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def executor_kind(executor: str | None) -> str:
    if not executor:
        return "none"
    return "local" if executor == "local" else "peer"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, help_: str, *labels: str) -> Counter:
            return Counter(name, help_, list(labels), registry=r)

        def histogram(name: str, help_: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, help_, ["realm", "executor"], buckets=buckets, registry=r)

        who = "this node's users"
        self.queries = counter("rentahal_queries", f"Queries of {who} that ended", "realm", "outcome", "executor")
        self.latency = histogram("rentahal_query_duration_seconds", f"Submission to answer, {who}", LATENCY_BUCKETS)
        self.ttft = histogram("rentahal_time_to_first_token_seconds", "Submission to the first token", TTFT_BUCKETS)
        self.tokens = counter("rentahal_tokens", f"Tokens generated for {who}", "realm")
        self.images = counter("rentahal_images", f"Images generated for {who}")
        self.failovers = counter("rentahal_failovers", "Attempts failed over to another executor", "cause")
        self.executed = counter(
            "rentahal_executed_queries", "Queries this node's models ran", "realm", "requester", "outcome"
        )
        self.refusals = counter("rentahal_rate_limited", "Submissions refused by a rate limit", "channel")
        self.api_errors = counter("rentahal_api_errors", "OpenAI API answers with an error", "status")
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_open_fds, CPU seconds

    def asked(self, realm: str) -> dict[str, int]:
        """This node's users' queries of ``realm`` since start: routed here or to peers."""
        mine = {  # read back from the counter itself: (realm, outcome, executor kind) -> queries
            (x.labels["realm"], x.labels["outcome"], x.labels["executor"]): int(x.value)
            for family in self.queries.collect()
            for x in family.samples
            if x.name.endswith("_total") and x.labels["realm"] == realm
        }
        return {
            "asked_done": sum(n for (_, o, _), n in mine.items() if o == "done"),
            "asked_failed": sum(n for (_, o, _), n in mine.items() if o == "failed"),
            "asked_cancelled": sum(n for (_, o, _), n in mine.items() if o == "cancelled"),
            "answered_by_peers": sum(n for (_, o, k), n in mine.items() if o == "done" and k == "peer"),
        }

    # --- events -------------------------------------------------------------------------------
    def query_ended(
        self,
        realm: str,
        outcome: str,
        executor: str | None,
        seconds: float,
        ttft: float | None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        kind = executor_kind(executor)
        self.queries.labels(realm, outcome, kind).inc()
        if outcome != "done":
            return
        self.latency.labels(realm, kind).observe(max(seconds, 0.0))
        if ttft is not None:
            self.ttft.labels(realm, kind).observe(max(ttft, 0.0))
        tokens = (stats or {}).get("tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens < 1 << 40:
            self.tokens.labels(realm).inc(tokens)
        if realm == "imagine":
            self.images.inc()

    def failover(self, cause: str) -> None:
        self.failovers.labels(cause).inc()

    def executed_query(self, realm: str, *, for_peer: bool, outcome: str) -> None:
        self.executed.labels(realm, "peer" if for_peer else "local", outcome).inc()

    def rate_limited(self, channel: str) -> None:
        self.refusals.labels(channel).inc()

    def api_error(self, status: int) -> None:
        self.api_errors.labels(str(status)).inc()

    def add_levels(self, read: Callable[[], dict[str, Any]]) -> None:
        """Levels read from the node at each scrape (see :class:`NodeCollector`)."""
        self.registry.register(NodeCollector(read))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class NodeCollector(Collector):
    """Gauges and counters the node keeps anyway, read at scrape time. ``read()`` returns::

    {"realms": {realm: {"queue_depth": n, "running": n, "served": 0|1}},
     "peers": {state: n}, "gossip": {name: n}, "dht": {name: n}, "relay": {name: n}}
    """

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def describe(self) -> list[Metric]:
        return []  # not known before the node runs: collected only

    def collect(self) -> Iterator[Metric]:
        snap = self.read()
        depth = GaugeMetricFamily("rentahal_queue_depth", "Queries queued or running here, by realm", labels=["realm"])
        running = GaugeMetricFamily("rentahal_running", "Queries running here now, by realm", labels=["realm"])
        served = GaugeMetricFamily("rentahal_realm_served", "1 if this node serves the realm now", labels=["realm"])
        for realm, r in snap.get("realms", {}).items():
            depth.add_metric([realm], r.get("queue_depth", 0))
            running.add_metric([realm], r.get("running", 0))
            served.add_metric([realm], r.get("served", 0))
        yield from (depth, running, served)
        peers = GaugeMetricFamily("rentahal_peers", "Known peers, by state", labels=["state"])
        for state, n in snap.get("peers", {}).items():
            peers.add_metric([state], n)
        yield peers
        for group, help_ in (
            ("gossip", "Health-record gossip since start"),
            ("dht", "Kademlia DHT provides and lookups since start"),
            ("relay", "Circuit relay use since start"),
        ):
            for name, value in snap.get(group, {}).items():
                if name.endswith("_now"):  # a level, not a count
                    g = GaugeMetricFamily(f"rentahal_{group}_{name[:-4]}", help_)
                    g.add_metric([], value)
                    yield g
                else:
                    c = CounterMetricFamily(f"rentahal_{group}_{name}", help_)
                    c.add_metric([], value)
                    yield c
