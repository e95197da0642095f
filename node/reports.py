"""What the node tells the people and programs looking at it: its status, health, peers,
realms, models, statistics and metrics levels, built on demand from its services (read only).
The control protocol, the dashboard, the OpenAI API's model list and /metrics read these."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..p2p import addrs as addrlib
from ..p2p.peers import PeerState
from ..p2p.reachability import Reachability
from .config import REALMS

if TYPE_CHECKING:
    from .daemon import Node


class Reports:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def dashboard_snapshot(self) -> dict[str, Any]:
        """What a dashboard shows, in one piece (node/dashboard.py pushes it every second)."""
        return {
            "status": self.status_report(),
            "realms": self.realms_report(),
            "stats": await self.stats_report(),
            "peers": self.peers_report(),
        }

    async def stats_report(self) -> dict[str, Any]:
        node = self.node
        stored = await node.storage.stats()
        out = {}
        zero = {
            "served_local": 0,
            "served_for_peers": 0,
            "failures": 0,
            "cancelled": 0,
            "avg_ms": None,
            "p95_ms": None,
            "total_cost": 0.0,
        }
        for realm in REALMS:
            slot = node.local.slots[realm]
            row = {**zero, **stored.get(realm, {})}
            # what this node's users asked (a routing-only node's whole work), since start
            out[realm] = {
                **row, **node.metrics.asked(realm), "queue_depth": slot.queue.depth, "running": slot.queue.running,
            }  # fmt: skip
        return out

    # --- reports for the CLI and UI ----------------------------------------------------------
    def peers_report(self) -> list[dict[str, Any]]:
        node = self.node
        out = []
        connected = node.fh.connected_peers()
        for e in node.table:
            realms = [r.name for r in e.record.realms] if e.record else []
            age = node.table.record_age(e)
            out.append(
                {
                    "peer_id": e.peer_id,
                    "name": e.record.node_name if e.record else "",  # what the peer calls itself
                    "addrs": list(e.addrs),
                    "realms": realms,
                    "models": {r.name: r.model for r in e.record.realms} if e.record else {},
                    "scores": {r: node.table.score(e, r) for r in realms},
                    "score": max((node.table.score(e, r) for r in realms), default=0.0),
                    "state": node.table.state(e).value,
                    "record_age_s": None if age is None else round(age, 3),
                    "rtt_ms": None if e.rtt_ms is None else round(e.rtt_ms, 3),
                    "latency_ms": None if e.latency_ms is None else round(e.latency_ms, 3),
                    "connected": e.peer_id in connected,
                    "path": ("relayed" if e.relayed else "direct") if e.peer_id in connected else None,
                    "unreachable": e.unreachable or None,
                    "verified_addrs": list(reversed(e.verified)),
                    "failures": e.consecutive_failures,
                    "last_failure": e.last_failure,
                    "violations": e.violations,
                    "proven": node.table.proven(e),  # answered a query or a spot-check of this node's
                    "spot_checked": e.spot_passed,
                    "caught": e.caught or None,
                    "reports": e.reports,
                    "trusted": [r for r, rc in node.config.realms.items() if e.peer_id in rc.trusted],
                    "allowed": [r for r, rc in node.config.realms.items() if e.peer_id in rc.allow],
                    "blocked": (
                        "by the sysop" if e.blocked else e.penalty_reason if node.table.is_blocked(e.peer_id) else None
                    ),
                    "sources": sorted(e.sources),
                }
            )
        return sorted(out, key=lambda p: p["peer_id"])

    def realms_report(self) -> list[dict[str, Any]]:
        node = self.node
        out = []
        for realm in REALMS:
            slot = node.local.slots[realm]
            peers, _ = node.table.candidates(realm)
            out.append(
                {
                    "realm": realm,
                    "local": {
                        "status": slot.status,
                        "model": slot.model,
                        "smoke_test": slot.smoke_test,
                        "queue_depth": slot.queue.depth,
                    },
                    "live_peers": len(peers),
                    "peers": [c.peer_id for c in peers],
                }
            )
        return out

    def reachability_report(self) -> dict[str, Any]:
        """Whether peers can dial this node, in words and as data, and the --bootstrap string a
        friend should use."""
        node = self.node
        state = node.dialback.state
        addrs = node.fh.addrs()
        relayed = [a for a in addrs if "/p2p-circuit" in a]
        direct = [a for a in addrs if "/p2p-circuit" not in a]
        public = [a for a in direct if addrlib.scope(a) in ("public", "dns")] or [
            addrlib.with_peer(a, node.peer_id) for a in node.dialback.verdict.public_addrs
        ]
        announced = [addrlib.with_peer(a, node.peer_id) for a in node.config.p2p.announce]
        if state is Reachability.PUBLIC:
            best = (announced or public or direct or [""])[0]
            text = f"public at {addrlib.without_peer(best, node.peer_id)}"
        elif relayed:
            best = relayed[0]
            text = f"behind NAT, reachable via relay {addrlib.without_peer(best, node.peer_id)}"
        elif state is Reachability.PRIVATE:
            best = (announced or [""])[0]
            text = "unreachable: behind NAT or a firewall, and no relay reservation yet"
        elif node.fh.local_only():
            best = direct[0] if direct else ""
            text = "local only: listening on loopback, reachable from this host alone"
        else:
            best = (announced or direct or [""])[0]
            text = "unknown: no peer has tried to dial this node yet"
        return {
            "state": "relayed" if state is not Reachability.PUBLIC and relayed else state.value,
            "text": text,
            "bootstrap": best,
            "relays": relayed,
            "witnesses": {
                ip: {"dialed": ok, "seen_ip": seen, "port": port}
                for ip, (ok, seen, port, _) in node.dialback.verdict.answers.items()
            },
        }

    def models_report(self) -> list[dict[str, Any]]:
        """Every model served here or by a live peer: its name, realm and how many executors."""
        node = self.node
        counts: dict[tuple[str, str], int] = {}
        for realm in REALMS:
            if node.local.serves(realm) and node.local.model_name(realm):
                key = (node.local.model_name(realm), realm)
                counts[key] = counts.get(key, 0) + 1
            for c in node.table.candidates(realm)[0]:
                model = node.router._peer_model(c.peer_id, realm)
                if model:
                    counts[(model, realm)] = counts.get((model, realm), 0) + 1
        realms_of: dict[str, int] = {}
        for m, _ in counts:
            realms_of[m] = realms_of.get(m, 0) + 1
        # A name served in two realms (the smoke-test models) is listed once per realm, as realm:name.
        return [
            {"id": m if realms_of[m] == 1 else f"{r}:{m}", "model": m, "realm": r, "executors": n}
            for (m, r), n in sorted(counts.items(), key=lambda x: (x[0][1], x[0][0]))
        ]

    def metrics_levels(self) -> dict[str, Any]:
        """What /metrics reads at each scrape (node/metrics.NodeCollector)."""
        node = self.node
        peers: dict[str, int] = {state.value: 0 for state in PeerState}
        for e in node.table:
            peers[node.table.state(e).value] += 1
        budget = node.gossip.budget
        disc = node.realm_discovery
        return {
            "realms": {
                realm: {
                    "queue_depth": slot.queue.depth,
                    "running": slot.queue.running,
                    "served": int(node.local.serves(realm)),
                }
                for realm, slot in node.local.slots.items()
            },
            "peers": peers,
            "gossip": {
                "records_published": node.gossip.published,
                "records_accepted": node._records_accepted,
                "records_rejected": node.gossip.checker.rejected,
                "messages_dropped": budget.dropped if budget else 0,
                "introductions_refused": budget.refused_introductions if budget else 0,
            },
            "dht": {
                "provides_ok": disc.provides_ok,
                "provides_failed": disc.provides_failed,
                "lookups": disc.lookups,
                "lookups_failed": disc.lookups_failed,
                "providers_found": disc.providers_found,
            },
            "relay": {"reservations_now": len(node.relay.reservations), "serving_now": int(node.relay.hop)},
        }

    def health_report(self) -> dict[str, Any]:
        """``GET /healthz``: up (it answers), its peer ID, and each realm's state (ready,
        loading, disabled, not served: ...), for supervisors and harnesses."""
        node = self.node
        return {
            "ok": True,
            "peer_id": node.peer_id,
            "uptime_s": round(time.time() - node.started_at, 1),
            "realms": {realm: node.local.slots[realm].status for realm in REALMS},
        }

    def status_report(self) -> dict[str, Any]:
        node = self.node
        return {
            "peer_id": node.peer_id,
            "name": node.config.node.name,
            "version": __version__,
            "reachability": self.reachability_report(),
            "listen": node.fh.listen_addrs(),
            "addrs": node.fh.addrs(),
            "ui": node.ui_url,
            "uptime_s": round(time.time() - node.started_at, 1),
            "queries_served_for_peers": node._queries_served,
            "gossip": {  # what peers' gossip cost this node, and what it refused
                "records_published": node.gossip.published,
                "records_rejected": node.gossip.checker.rejected,
                "messages_dropped": node.gossip.budget.dropped if node.gossip.budget else 0,
                "streams_reset": node.gossip.budget.dropped_streams if node.gossip.budget else 0,
                "introductions_refused": node.gossip.budget.refused_introductions if node.gossip.budget else 0,
            },
            "spot_checks": {"canaries_sent": node.spot.checks, "peers_caught": node.spot.caught},
            "dashboards": {"open": len(node.dashboards), "snapshots_built": node.dashboards.built},
        }
