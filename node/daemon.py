"""The Node: one nursery that owns the libp2p host, the services around it and the local UI.

Start-up order matters and is expressed with ``nursery.start``: listen, then serve the query
protocol and gossip, then dial the bootstrap list, then advertise realms once models are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from .. import __version__
from ..p2p.budget import ByteBudget, ConnectionGate
from ..p2p.discovery import RealmDiscovery
from ..p2p.gossip import GossipBudget, HealthGossip
from ..p2p.health import HealthRecord
from ..p2p.host import DialError, FederationHost, open_federation_host
from ..p2p.identity import Identity
from ..p2p.maintenance import PeerMaintenance
from ..p2p.mdns import LanDiscovery
from ..p2p.peers import PeerState, PeerTable
from ..p2p.query import IncomingQuery, QueryClient, QueryService
from ..p2p.ratelimit import RateLimiter
from ..p2p.reachability import PROTOCOL_ID as DIALBACK_ID
from ..p2p.reachability import DialBack, Reachability
from ..p2p.relay import RelayLimits, RelayService
from ..p2p.wire import PROTOCOL_ID
from ..realms import events as ev
from ..realms.catalog import backend_payload
from ..realms.events import Code, ExecutorFailure, FailureKind, QueryError, StorageFailure
from ..realms.queue import Priority
from ..realms.router import LOCAL, Query, RealmRouter, StreamEmit
from ..realms.spotcheck import SpotChecker
from .apikeys import ApiKeys
from .config import REALMS, Config
from .control import serve_control
from .dashboard import Dashboards
from .datadir import RUN_FILE, SYSOP_TOKEN_FILE
from .executor import LocalRealms, check_payload
from .metrics import Metrics
from .peer_memory import PeerMemory
from .queries import QueryManager, Refused
from .reports import Reports
from .storage import Storage
from .sysop import Sysop
from .violations import Violations

log = logging.getLogger("rentahal.node")

MAX_PEERS = 5000
OUTCOME_FLUSH = 1.0
WATCH_EXECUTORS = 0.5  # how often live executors without an open query stream are looked for
MAX_WATCHED = 64  # executors a node holds an idle query stream to
WATCH_RETRY = 10.0  # seconds before a peer that refused a query stream is tried again


def read_sysop_token(data_dir: Path) -> str:
    """The local sysop token, created (mode 0600) if missing."""
    import secrets

    from ..p2p.identity import write_private_file

    path = data_dir / SYSOP_TOKEN_FILE
    token = path.read_text().strip() if path.exists() else ""
    if len(token) < 32:  # missing, or a weak one written by hand: never accept it
        if token:
            log.warning("sysop token in %s was too short; wrote a new one", path)
        token = secrets.token_urlsafe(32)
        write_private_file(path, (token + "\n").encode())
    return token


class Node:
    def __init__(self, config: Config, data_dir: Path, identity: Identity) -> None:
        self.config = config
        self.data_dir = data_dir
        self.identity = identity
        self.peer_id = identity.peer_id
        self.local = LocalRealms(config, data_dir)
        self.started_at = time.time()
        self.ui_url = ""
        self.fh: FederationHost
        self.table: PeerTable
        self.router: RealmRouter
        self._queries_served = 0
        self._records_accepted = 0  # health records that changed the peer table (for /metrics)
        self.sysop_token = read_sysop_token(data_dir)
        self._attempts: dict[str, int] = {}  # peer -> our queries running on it now
        self.submit_limiter = RateLimiter(config.limits.queries_per_minute, config.limits.burst)
        self.peer_limiter = RateLimiter(config.limits.peer_queries_per_minute, config.limits.peer_burst)
        self.metrics = Metrics()
        self.reports = Reports(self)
        self.local.metrics = self.metrics

    # --- lifecycle ---------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        self.storage = await Storage.open(self.data_dir, cfg.storage.shards)
        self.api_keys = ApiKeys(self.storage)
        try:
            await self._run(task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.storage.aclose()

    async def _run(self, task_status: trio.TaskStatus[Node]) -> None:
        cfg = self.config
        self.local.storage = self.storage
        self.local.peer_id = self.peer_id
        overrides = await self.storage.realm_overrides()
        self.local.disabled = {realm for realm, enabled in overrides.items() if not enabled}
        lim = cfg.limits
        gate = ConnectionGate(
            pending_per_ip=lim.pending_per_ip, open_per_ip=lim.inbound_per_ip, total=lim.inbound_total
        )
        async with open_federation_host(
            self.identity, cfg.p2p.listen, announce=cfg.p2p.announce, gate=gate, handshake_timeout=lim.handshake_timeout
        ) as fh:
            self.fh = fh
            self.table = PeerTable(
                self.peer_id,
                stale_after=cfg.p2p.stale_after,
                breaker_failures=cfg.router.breaker_failures,
                breaker_backoff=cfg.router.breaker_backoff,
                breaker_backoff_max=cfg.router.breaker_backoff_max,
                half_life=cfg.router.score_half_life,
                clock=trio.current_time,
            )
            self.client = QueryClient(
                fh.host,
                self.peer_id,
                dial_timeout=cfg.p2p.dial_timeout,
                first_progress=cfg.router.first_progress,
                hang_timeout=cfg.router.hang_timeout,
                verdict=self._verdict,
                on_broken=self.table.mark_unresponsive,
            )
            self.realm_discovery = RealmDiscovery(fh, self.table, refresh=cfg.p2p.dht_refresh, dial=self._dial_quietly)
            self.router = RealmRouter(
                self.table,
                self.local,
                self,
                local_queue_limit=cfg.router.local_queue_limit,
                max_attempts=cfg.router.max_attempts,
                trusted={r: frozenset(rc.trusted) for r, rc in cfg.realms.items() if rc.trusted},
                discover=self.realm_discovery.discover,
            )
            gate.refuse_peer = self.table.is_blocked
            for peer_id in await self.storage.blocked_peers():
                self.table.set_blocked(peer_id, True)
            self.maintenance = PeerMaintenance(
                fh,
                self.table,
                dial_timeout=cfg.p2p.dial_timeout,
                bootstrap=cfg.p2p.bootstrap,
                forget_after=cfg.p2p.forget_after,
                max_peers=MAX_PEERS,
                state_interval=cfg.p2p.health_interval / 2,
                quiet_after=cfg.p2p.health_heartbeat * 1.1,
            )
            self.maintenance.busy = lambda peer_id: peer_id in self._attempts
            self.queries = QueryManager(
                self.storage,
                self.router,
                origin=self.peer_id,
                query_deadline=cfg.router.query_deadline,
                max_payload_bytes=cfg.storage.max_payload_bytes,
                max_active_per_user=cfg.limits.max_active,
                check_payload=check_payload,
                metrics=self.metrics,
            )
            self.sysop = Sysop(
                self.storage,
                self.queries,
                realm_enabled=lambda realm, on: (self.local.disabled.discard if on else self.local.disabled.add)(realm),
                peer_blocked=self.table.set_blocked,
            )
            self.violations = Violations(self.table, fh)
            self.peer_memory = PeerMemory(self.storage, self.table, fh, self.peer_id, self._dial_quietly)
            service = QueryService(
                self._serve_peer_query,
                on_violation=self.violations.count,
                refuse=self.table.is_blocked,
                max_streams_per_peer=lim.peer_streams,
                frame_budget=ByteBudget(lim.buffer_bytes, lim.peer_buffer_bytes),
            )
            fh.set_stream_handler(PROTOCOL_ID, service.handle_stream)
            self.dialback = DialBack(fh)
            p2p = cfg.p2p
            self.relay = RelayService(
                fh,
                RelayLimits(p2p.relay_reservations, p2p.relay_duration, p2p.relay_bytes, p2p.relay_circuits),
                mode=p2p.relay_service,
            )
            fh.set_stream_handler(DIALBACK_ID, self.dialback.handle_stream)
            log.info("bound to %s", " ".join(fh.listen_addrs()))
            for addr in fh.addrs():
                log.info("listening on %s", addr)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.local.run)
                    await nursery.start(self.client.run)
                    nursery.start_soon(self._advertise)
                    nursery.start_soon(self.violations.run)
                    budget = GossipBudget(
                        cfg.p2p.gossip_per_second, cfg.p2p.introductions_per_minute, on_violation=self.violations.report
                    )
                    fh.pubsub.budget, fh.pubsub.refuse = budget, self.table.is_blocked
                    self.gossip = gossip = HealthGossip(
                        fh,
                        self.identity,
                        interval=cfg.p2p.health_interval,
                        heartbeat=cfg.p2p.health_heartbeat,
                        make_record=self.health_record,
                        on_record=self._take_record,
                        known=lambda peer_id: self.table.get(peer_id) is not None,
                        budget=budget,
                    )
                    self.maintenance.on_connect = lambda peer_id: nursery.start_soon(gossip.peer_connected, peer_id)
                    await nursery.start(gossip.run)
                    self.spot = SpotChecker(
                        self.table,
                        self_id=self.peer_id,
                        run_remote=self._canary_remote,
                        run_local=self._canary_local,
                        local_model=self._local_model,
                        every=cfg.router.spot_check_every,
                    )
                    await nursery.start(self.spot.run)
                    await nursery.start(self.relay.run)
                    await nursery.start(self.maintenance.run)
                    nursery.start_soon(self.peer_memory.rejoin)
                    nursery.start_soon(self.peer_memory.remember)
                    nursery.start_soon(self.dialback.run)
                    if cfg.p2p.mdns:
                        nursery.start_soon(LanDiscovery(fh, self._on_lan_peer).run)
                    nursery.start_soon(self._follow_reachability)
                    nursery.start_soon(self._flush_outcomes)
                    nursery.start_soon(self._watch_executors)
                    await nursery.start(self.queries.run)
                    self.metrics.add_levels(self.reports.metrics_levels)
                    self.dashboards = Dashboards(self.reports.dashboard_snapshot)
                    await nursery.start(self.dashboards.run)
                    self.ui_url = await nursery.start(serve_control, self)
                    self._write_run_file()
                    nursery.start_soon(self._keep_run_file)
                    log.info("ready peer=%s ui=%s", self.peer_id, self.ui_url)
                    task_status.started(self)
            finally:
                self._remove_run_file()
                with trio.CancelScope(shield=True):
                    await self.local.aclose()

    async def _keep_run_file(self) -> None:
        """Rewrite the run file as realms load or fail: it says what this node serves now."""
        while True:
            changed = self.local.next_status_change()  # taken before writing: no change is missed
            self._write_run_file()
            await changed.wait()

    def _write_run_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "peer_id": self.peer_id,
            "ui": self.ui_url,
            "addrs": self.fh.addrs(),
            "realms": {realm: self.local.slots[realm].status for realm in REALMS},
        }
        tmp = self.data_dir / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.data_dir / RUN_FILE)

    def _remove_run_file(self) -> None:
        try:
            info = json.loads((self.data_dir / RUN_FILE).read_text())
            if info.get("pid") == os.getpid():
                (self.data_dir / RUN_FILE).unlink()
        except (OSError, ValueError):
            pass

    async def _watch_executors(self) -> None:
        """Keep a query stream open to every live peer that serves a realm: a dead executor is
        then out of routing the moment that stream breaks, not when libp2p reports the closed
        connection (~0.2 s later), and a query to it needs no stream set-up."""

        async def watch(peer_id: str) -> None:
            try:
                await self.client.watch(peer_id)
            except ExecutorFailure as exc:
                log.debug("could not open a query stream to %s: %s", peer_id, exc.message)
                not_before[peer_id] = trio.current_time() + WATCH_RETRY  # it may not speak it
            finally:
                opening.discard(peer_id)

        opening: set[str] = set()
        not_before: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            while True:
                for e in self.table:
                    pid = e.peer_id
                    if len(self.client.keep) + len(opening) >= MAX_WATCHED:
                        break
                    if not_before.get(pid, 0.0) > trio.current_time():
                        continue
                    if (
                        pid not in self.client.sessions
                        and pid not in opening
                        and e.record is not None
                        and e.record.realms
                        and self.table.state(e) is PeerState.LIVE
                    ):
                        opening.add(pid)
                        nursery.start_soon(watch, pid)
                if len(not_before) > MAX_WATCHED * 4:
                    now = trio.current_time()
                    not_before = {p: t for p, t in not_before.items() if t > now}
                await trio.sleep(WATCH_EXECUTORS)

    async def _flush_outcomes(self) -> None:
        """Store the realm counters a second after one is counted (one transaction, however
        many queries); an idle node does not wake for them."""
        failing = False
        while True:
            await self.storage.outcomes_counted()
            await trio.sleep(OUTCOME_FLUSH)
            try:
                await self.storage.flush_outcomes()
                failing = False
            except StorageFailure as exc:
                if not failing:
                    log.warning("cannot store realm counters (%s); kept in memory", exc.message)
                failing = True

    # --- models and advertisement ------------------------------------------------------------
    async def _advertise(self) -> None:
        await self.local.loaded.wait()
        served = [r for r in REALMS if self.local.serves(r)]
        if not served:
            log.info("serving no realm: this node routes and asks only")
            return
        await self.realm_discovery.advertise(served)

    async def _dial_quietly(self, peer_id: str) -> None:
        """Dial through the maintenance service (it picks the addresses from the peer table)."""
        try:
            await self.maintenance.dial(peer_id)
        except DialError as exc:
            log.info("dial %s failed: %s", peer_id, exc)

    async def _follow_reachability(self) -> None:
        """Advertise the address peers dialed this node back on (its public one)."""
        while True:
            self.fh.book.confirmed = self.dialback.verdict.public_addrs
            state = self.dialback.state
            self.relay.set_hop(state is Reachability.PUBLIC)
            self.relay.want_reservations = state is Reachability.PRIVATE
            await self.dialback.changed.wait()

    async def _on_lan_peer(self, peer_id: str, addrs: tuple[str, ...]) -> None:
        self.table.hear_of(peer_id, addrs, source="mdns")
        await self._dial_quietly(peer_id)

    # --- health gossip -----------------------------------------------------------------------
    def health_record(self, seq: int) -> HealthRecord:
        return HealthRecord(
            peer_id=self.peer_id,
            seq=seq,
            timestamp=time.time(),
            realms=self.local.realm_statuses(),
            success_ratio=self.local.success_ratio(),
            version=__version__,
            addrs=tuple(self.fh.addrs())[:16],
            node_name=self.config.node.name,
        )

    def _take_record(self, record: HealthRecord) -> None:
        if self.table.apply_record(record):
            self._records_accepted += 1
            self.realm_discovery.records_changed()
            self.maintenance.record_arrived(record.peer_id)

    # --- queries -----------------------------------------------------------------------------
    async def execute(self, peer_id: str, query: Query, emit: StreamEmit) -> ev.Result:
        """RemoteExecutor for the router: run ``query`` on ``peer_id`` over the query protocol."""
        if not self.fh.is_connected(peer_id):
            try:
                await self.maintenance.dial(peer_id)
            except DialError as exc:
                raise ExecutorFailure(str(exc), Code.UNREACHABLE, kind=FailureKind.UNREACHABLE) from None
        self._attempts[peer_id] = self._attempts.get(peer_id, 0) + 1
        try:
            return await self.client.execute(
                peer_id,
                query_id=query.query_id,
                realm=query.realm,
                # The model was chosen by routing (the peer's health record): peers of a version
                # that does not know the field must not refuse the query for it.
                payload=backend_payload(query.payload),
                deadline_s=query.deadline_s,
                emit=emit,
            )
        finally:
            left = self._attempts.pop(peer_id, 1) - 1
            if left:
                self._attempts[peer_id] = left

    # --- spot-checks and reports ----------------------------------------------------------------
    async def _canary_remote(self, peer_id: str, query: Query) -> ev.Result:
        async def ignore(event: ev.StreamEvent) -> None:
            pass

        return await self.execute(peer_id, query, ignore)

    async def _canary_local(self, query: Query) -> ev.Result:
        async def ignore(event: ev.StreamEvent) -> None:
            pass

        return await self.local.execute(replace(query, priority=Priority.PEER), ignore)  # behind users

    def _local_model(self, realm: str) -> str | None:
        if not self.local.serves(realm):
            return None
        return next((s.model for s in self.local.realm_statuses() if s.name == realm), None)

    def caught_reason(self, peer_id: str) -> str:
        e = self.table.get(peer_id) if peer_id else None
        return e.caught if e is not None else ""

    def report_answer(self, row: dict[str, Any], reason: str) -> dict[str, Any]:
        """A user says the answer to ``row`` was wrong."""
        executor = row.get("executor") or ""
        if not executor or executor == LOCAL or executor == self.peer_id:
            raise Refused(
                "bad_request",
                f"query {row['id']} was not answered by a peer "
                f"({'by this node' if executor else 'not answered'}): nothing to report",
            )
        self.table.record_report(executor, reason)
        self.spot.check_now(executor)
        log.info(
            "user reported an answer of %s as wrong (query %s): %s", executor, row["id"], reason or "no reason given"
        )
        return {"query_id": row["id"], "executor": executor, "reported": True, "spot_check": "queued"}

    def _verdict(self, peer_id: str) -> tuple[FailureKind, str] | None:
        """Whether this node's attempts on ``peer_id`` are lost, on evidence other than the
        stream itself: the peer went stale, unresponsive or away."""
        entry = self.table.get(peer_id)
        if entry is None:
            return None
        state = self.table.state(entry)
        if state is PeerState.STALE:
            return (
                FailureKind.HUNG,
                f"{peer_id} went stale (no health record for {self.table.record_age(entry) or 0:.1f}s)",
            )
        if state is PeerState.UNRESPONSIVE:
            return FailureKind.HUNG, f"{peer_id} is unresponsive ({entry.unresponsive})"
        if not self.fh.is_connected(peer_id):
            return FailureKind.DEAD, f"{peer_id} disconnected"
        return None

    async def _serve_peer_query(self, incoming: IncomingQuery, emit: StreamEmit) -> ev.Result:
        req = incoming.request
        if self.table.is_blocked(incoming.peer_id):
            raise ExecutorFailure("this node does not serve you", Code.BUSY)
        wait = self.peer_limiter.take(incoming.peer_id)
        if wait > 0:
            self.metrics.rate_limited("peer")
            limits = self.config.limits
            if self.peer_limiter.first_refusal(incoming.peer_id):
                log.warning(
                    "rate-limited peer %s (%g queries/min, burst %d)",
                    incoming.peer_id,
                    limits.peer_queries_per_minute,
                    limits.peer_burst,
                )
            raise ExecutorFailure(
                f"rate limited: more than {limits.peer_queries_per_minute:g} queries per minute from "
                f"your node (burst {limits.peer_burst}); try again in {max(wait, 0.1):.1f} s",
                Code.BUSY,
                retry_after=max(wait, 0.05),
            )
        rc = self.config.realms.get(req.realm)
        if rc is not None and rc.allow and incoming.peer_id not in rc.allow:
            raise ExecutorFailure(
                f"{req.realm} is private on this node: your node is not on its allow list", Code.REALM_NOT_SERVED
            )
        query = Query(
            req.query_id,
            req.realm,
            dict(req.payload),
            req.deadline_ms / 1000.0,
            incoming.peer_id,
            priority=Priority.PEER,
        )
        log.debug("query %s (%s) from peer %s", req.query_id, req.realm, incoming.peer_id)
        try:
            result = await self.local.execute(query, emit)
        except QueryError:
            raise
        except Exception as exc:
            log.error("query %s failed inside this node: %s: %s", req.query_id, type(exc).__name__, exc)
            raise QueryError(f"{type(exc).__name__}", Code.INTERNAL) from None
        self._queries_served += 1
        return result


__all__ = ["RUN_FILE", "Node"]
