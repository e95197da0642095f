"""Health gossip: publish this node's signed record when it changes (at most once per
``interval``), at once when a peer connects, and otherwise every ``heartbeat`` seconds; take
others' records, validated **before** GossipSub relays them onward.

Work a peer can make this node do is budgeted before it is done: every gossip message a
forwarder sends is charged to that forwarder's token bucket ahead of any decoding or signature
check (``BudgetedPubsub``), and a forwarder may introduce only so many peers this node has never
heard of. The topic validator runs inside the pubsub router, ahead of forwarding: a record that
does not verify under its author's key, names another peer than the message's author, carries a
timestamp far from this clock, or repeats a sequence number already seen from that author (a
replay) is rejected, so this node never spreads it. A forged one (or one dated ahead of this
clock) counts against the forwarder; an old or repeated one does not, since pubsub itself replays
what it holds to a peer that (re)connects. Each signature is checked once: pubsub's strict
signing verifies the message's signature by its author, so the record inside is not verified a
second time. Rejections are logged once per (author, reason), with a bound on the memory used.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from ..node.limits import GOSSIP_BYTES_PER_MESSAGE as BYTES_PER_MESSAGE
from ..node.limits import GOSSIP_COOL_DOWN as COOL_DOWN
from ..node.limits import GOSSIP_MAX_AUTHORS as MAX_AUTHORS
from ..node.limits import GOSSIP_MAX_WARNINGS as MAX_WARNINGS
from ..node.limits import GOSSIP_READ_CHUNK as READ_CHUNK
from ..node.limits import MAX_RECORD_SKEW, SENDER_RECORD_RECHECK, SENDER_RECORDS_KEPT, SUBSCRIPTION_WAIT
from .health import HEALTH_TOPIC, HealthRecord, sign_record, verify_record
from .host import FederationHost, libp2p_id
from .identity import Identity
from .ratelimit import RateLimiter

log = logging.getLogger("rentahal.p2p")

# The peer whose pubsub stream the current task reads (trio gives each task its own context).
_READING_FROM: contextvars.ContextVar[Any] = contextvars.ContextVar("rentahal_gossip_reading_from", default=None)


class RecordCheck:
    """The validator's state: last sequence number per author (bounded, least recent dropped)."""

    def __init__(self, self_id: str, *, clock: Callable[[], float] = time.time) -> None:
        self.self_id = self_id
        self.clock = clock
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self._warned: set[tuple[str, str]] = set()
        self.rejected = 0
        self.last_reason = ""  # why the last check failed, if that is the forwarder's fault ("" if not)

    def check(self, author: str, data: bytes, *, author_signed: bool = False) -> HealthRecord | None:
        """The verified record, or None (and one log line per author and reason)."""
        self.last_reason = ""
        try:
            record = verify_record(data, author=author, author_signed=author_signed)
        except Exception as exc:  # HealthRecordError, or a bug: never let gossip kill the node
            return self._reject(author, str(exc))
        age = self.clock() - record.timestamp
        if age > MAX_RECORD_SKEW:
            # Old, but genuinely the author's: nobody's fault here. An honest forwarder relays a
            # record it took while fresh, and pubsub replays its recent messages (and those it
            # held for a peer still connecting) to a peer that (re)connects: a node restarting
            # near a busy one is handed a burst of them. Counting those against the forwarder
            # got restarted nodes to block their own bootstrap peer. (A flood of them is
            # charged to the forwarder's gossip budget before any of this.)
            return self._reject(
                author, f"timestamp {age:.0f}s old (replayed late, or its clock is behind)", blame=False
            )
        if -age > MAX_RECORD_SKEW:
            return self._reject(author, f"timestamp {-age:.0f}s ahead of this clock (forged, or a clock far off)")
        last = self._last_seq.get(author)
        if last is not None and record.seq <= last:
            return self._reject(author, f"sequence {record.seq} not after {last} (replayed)", quiet=True, blame=False)
        self._last_seq[author] = record.seq
        self._last_seq.move_to_end(author)
        while len(self._last_seq) > MAX_AUTHORS:
            self._last_seq.popitem(last=False)
        return record

    def _reject(self, author: str, reason: str, *, quiet: bool = False, blame: bool = True) -> HealthRecord | None:
        """``quiet``: no log line; ``blame``: the forwarder is at fault (see ``last_reason``)."""
        self.rejected += 1
        self.last_reason = reason if blame else ""
        key = (author, reason.split(" ", 1)[0])
        if not quiet and key not in self._warned and len(self._warned) < MAX_WARNINGS:
            self._warned.add(key)
            log.warning("ignored health record from %s: %s", author, reason)
        return None


Violation = Callable[[str, str], None]  # (peer ID, what it did): counted by the node


class GossipBudget:
    """Token buckets per forwarder on the gossip messages it sends (``per_second``, a burst of
    twice that), and on the peers it introduces (``introductions_per_minute``). Over budget, a
    message is dropped unread; the first drop in a window counts once against the forwarder."""

    def __init__(
        self,
        per_second: float,
        introductions_per_minute: float,
        *,
        on_violation: Violation | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.messages = RateLimiter(per_second * 60.0, max(1, int(2 * per_second)), clock=clock)
        # Bytes on a peer's pubsub stream: room for a full record per message, and the burst.
        self.bytes_per_second = per_second * BYTES_PER_MESSAGE
        self._bytes: OrderedDict[object, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._cooling: OrderedDict[object, float] = OrderedDict()  # key -> refused until
        self._over: OrderedDict[object, tuple[float, int]] = OrderedDict()  # key -> (since, dropped)
        self.introductions = RateLimiter(introductions_per_minute, max(1, int(introductions_per_minute)), clock=clock)
        self.on_violation = on_violation
        self.clock = clock
        self.dropped = 0
        self.dropped_streams = 0
        self.refused_introductions = 0
        self._reported: OrderedDict[object, float] = OrderedDict()  # forwarder -> last report

    def admit(self, forwarder: object) -> bool:
        """One message from ``forwarder`` (a libp2p ID: hashing it is cheaper than naming it).
        A forwarder that sends more than a burst's worth of messages past its budget within a
        second is flooding: its stream is cut as for its byte budget (``cooling``), rather than
        read and dropped message by message."""
        if self.messages.take(forwarder) == 0.0:
            return True
        self.dropped += 1
        now = self.clock()
        since, n = self._over.get(forwarder, (now, 0))
        since, n = (since, n + 1) if now - since < 1.0 else (now, 1)
        self._over[forwarder] = (since, n)
        self._over.move_to_end(forwarder)
        while len(self._over) > MAX_AUTHORS:
            self._over.popitem(last=False)
        if n > self.messages.burst:
            self._cool(forwarder, now)
        self._report(forwarder, "more gossip messages than the per-forwarder budget")
        return False

    def take_bytes(self, forwarder: object, n: int) -> bool:
        """``n`` bytes read from ``forwarder``'s pubsub stream. Over its budget, the stream is
        to be reset unread, and the forwarder's next streams too for COOL_DOWN seconds."""
        now = self.clock()
        cap = 2 * self.bytes_per_second
        tokens, at = self._bytes.get(forwarder, (cap, now))
        tokens = min(cap, tokens + (now - at) * self.bytes_per_second) - n
        self._bytes[forwarder] = (tokens, now)
        self._bytes.move_to_end(forwarder)
        while len(self._bytes) > MAX_AUTHORS:
            self._bytes.popitem(last=False)
        if tokens >= 0:
            return True
        self._cool(forwarder, now)
        self._report(forwarder, f"more than {self.bytes_per_second:.0f} bytes a second of gossip")
        return False

    def _cool(self, forwarder: object, now: float) -> None:
        self._cooling[forwarder] = now + COOL_DOWN
        self._cooling.move_to_end(forwarder)
        while len(self._cooling) > MAX_AUTHORS:
            self._cooling.popitem(last=False)

    def cooling(self, forwarder: object) -> bool:
        """Whether ``forwarder`` flooded its stream a moment ago (its new streams are refused)."""
        until = self._cooling.get(forwarder)
        return until is not None and until > self.clock()

    def introduce(self, forwarder: str, author: str) -> bool:
        """``forwarder`` relays the record of ``author``, a peer this node has not heard of."""
        if self.introductions.take(forwarder) == 0.0:
            return True
        self.refused_introductions += 1
        self._report(forwarder, f"introduces more new peers than the budget (e.g. {author})")
        return False

    def _report(self, forwarder: object, reason: str) -> None:
        now = self.clock()
        if now - self._reported.get(forwarder, -1e9) < 1.0:
            return  # one count per second of flooding, however fast it floods
        self._reported[forwarder] = now
        self._reported.move_to_end(forwarder)
        while len(self._reported) > MAX_AUTHORS:
            self._reported.popitem(last=False)
        if self.on_violation is not None:
            self.on_violation(str(getattr(forwarder, "to_base58", lambda: forwarder)()), reason)


class _MeteredStream:
    """A peer's pubsub stream as py-libp2p's reader sees it: read in chunks (the library reads
    each message's length one byte at a time, and every read of a muxed stream may send a
    window update), each chunk charged to the peer's byte budget before any of it is parsed.
    Past the budget the stream is reset and reading stops."""

    def __init__(self, stream: Any, budget: GossipBudget, key: object) -> None:
        self._stream = stream
        self._budget = budget
        self._key = key
        self._buf = bytearray()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        from libp2p.network.stream.exceptions import StreamEOF

        if not self._buf:
            data = await self._stream.read(READ_CHUNK)
            if not data:
                return b""
            # Past its byte budget, or flooding past its message budget: the rest goes unread.
            if not self._budget.take_bytes(self._key, len(data)) or self._budget.cooling(self._key):
                self._budget.dropped_streams += 1
                with trio.move_on_after(1):
                    try:
                        await self._stream.reset()
                    except Exception:
                        pass
                raise StreamEOF("gossip budget exceeded: stream reset")
            self._buf += data
        size = len(self._buf) if n is None or n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


def flood_publish_gossipsub_class() -> type:
    """py-libp2p's GossipSub, but this node's own messages go to every peer subscribed to the
    topic, not only to its mesh (go-libp2p's ``floodPublish``, on by default there): a node that
    has just connected has an empty mesh until the next heartbeat's GRAFT, and its record would
    otherwise reach nobody for a second. Relayed messages follow the mesh as before."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub

    v11_and_before = {PROTOCOL_ID, PROTOCOL_ID_V11}

    class FloodPublishGossipSub(GossipSub):
        def _get_peers_to_send(
            self, topic_ids: Any, msg_forwarder: Any, origin: Any, msg_id: bytes | None = None
        ) -> Any:
            topic_ids = list(topic_ids)
            chosen = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
            yield from chosen
            if self.pubsub is not None and origin == self.pubsub.my_id:
                for topic in topic_ids:
                    for peer in self.pubsub.peer_topics.get(topic, ()):
                        if peer not in chosen and peer != msg_forwarder:
                            chosen.add(peer)
                            yield peer

        async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Any) -> None:
            # IDONTWANT is GossipSub 1.2; this router speaks 1.1 only (p2p/host.py), so none of
            # its peers can take one, but the library builds its mesh-peer sets for every new
            # message to find that out (5 % of an idle node's busy samples, py-spy).
            if any(p not in v11_and_before for p in self.protocols):
                await super()._emit_idontwant_for_message(msg_id, topic_ids)

    return FloodPublishGossipSub


def _verify_sender_records_once() -> None:
    """py-libp2p 0.8.1 checks the signed peer record that rides on every pubsub RPC (an Ed25519
    verification and a peerstore update) each time, though a peer sends the same record bytes
    over and over: 13 % of an idle node's busy samples in a 10-node federation (py-spy). Wrapped
    by :func:`verified_once`. Installed on pubsub's module, once per process."""
    from libp2p.pubsub import pubsub as pubsub_module

    name = "maybe_consume_signed_record"  # looked up in pubsub's module on every RPC
    check = getattr(pubsub_module, name)
    if not getattr(check, "verified_once", False):
        setattr(pubsub_module, name, verified_once(check))


def verified_once(check: Callable[[Any, Any, Any], bool], *, clock: Callable[[], float] = time.monotonic) -> Any:
    """``check(rpc, host, peer_id)``, but a (peer, record bytes) pair that passed is passed again
    without a check until SENDER_RECORD_RECHECK seconds have gone by (the same bytes from the
    same peer verify the same way; the recheck renews the record's place in the peerstore, kept
    there for 2 hours). A record that fails is checked every time; any other bytes are new."""
    verified: OrderedDict[tuple[bytes, bytes], float] = OrderedDict()

    def check_once(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (peer_id.to_bytes(), bytes(msg.senderRecord))
        now = clock()
        at = verified.get(key)
        if at is not None and now - at < SENDER_RECORD_RECHECK:
            return True
        if not check(msg, host, peer_id):
            return False
        verified[key] = now
        verified.move_to_end(key)
        while len(verified) > SENDER_RECORDS_KEPT:
            verified.popitem(last=False)
        return True

    check_once.verified_once = True  # type: ignore[attr-defined]
    return check_once


def budgeted_pubsub_class() -> type:
    """py-libp2p's Pubsub with every peer's stream metered (``_MeteredStream``), and each
    message it reads charged to its forwarder (GossipBudget.admit), refused when the node has
    blocked the forwarder, and dropped when pubsub has already seen it, all **before** the library
    spawns a task for it. (Pubsub 0.8.1 spawns one task per message read, and finding the new
    task's parent walks every task the service holds: under a flood, or with an idle
    federation's relayed duplicates, that spawn was the largest cost of a message.) Built on
    first use, so importing this module does not import libp2p."""
    from libp2p.pubsub.pubsub import Pubsub

    _verify_sender_records_once()

    class BudgetedPubsub(Pubsub):
        budget: GossipBudget | None = None
        refuse: Callable[[str], bool] | None = None

        async def continuously_read_stream(self, stream: Any) -> None:
            peer = stream.muxed_conn.peer_id
            if self.budget is not None:
                cooling = self.budget.cooling(peer)
                if cooling or (self.refuse is not None and self.refuse(peer.to_base58())):
                    if cooling and self.budget.on_violation is not None:  # each one counts
                        self.budget.on_violation(peer.to_base58(), "opened a gossip stream while cut off for flooding")
                    with trio.move_on_after(1):
                        try:
                            await stream.reset()
                        except Exception:
                            pass
                    return
                stream = _MeteredStream(stream, self.budget, peer)
            # This task reads this one peer's stream and nothing else: every message that the
            # library's loop below hands to ``_is_subscribed_to_msg`` came from ``peer``.
            _READING_FROM.set(peer)
            await super().continuously_read_stream(stream)

        def _is_subscribed_to_msg(self, msg: Any) -> bool:
            """Called by the read loop for each message it read, just before it spawns the task
            that handles it: False drops the message there."""
            manager = getattr(self, "_manager", None)
            if manager is not None and manager.is_cancelled:
                # Pubsub is stopping: its task nursery may already be closed, and the library
                # (which checks only is_running) would raise out of the connection's reader.
                return False
            if not super()._is_subscribed_to_msg(msg):
                return False
            forwarder = _READING_FROM.get()
            if forwarder is None or forwarder == self.my_id:
                return True
            if self.budget is not None and not self.budget.admit(forwarder):
                return False
            if self.refuse is not None and self.refuse(forwarder.to_base58()):
                return False
            return not self._is_msg_seen(msg)  # push_msg would drop it too, after a spawn

    return BudgetedPubsub


class HealthGossip:
    def __init__(
        self,
        fh: FederationHost,
        identity: Identity,
        *,
        interval: float,
        heartbeat: float,
        make_record: Callable[[int], HealthRecord],
        on_record: Callable[[HealthRecord], None],
        known: Callable[[str], bool] = lambda peer_id: False,
        budget: GossipBudget | None = None,
    ) -> None:
        self.fh = fh
        self.identity = identity
        self.interval = interval  # the shortest gap between two records
        self.heartbeat = heartbeat  # the longest gap: a record even when nothing changed
        self.make_record = make_record
        self.on_record = on_record
        self.known = known  # has this node heard of the peer (no introduction needed)?
        self.budget = budget
        self.checker = RecordCheck(identity.peer_id)
        self._force = 0  # records to publish regardless of change
        self._wake = trio.Event()
        self.published = 0

    def changed(self) -> None:
        """Publish at the next look, not at the heartbeat."""
        self._force = 1
        self._wake.set()

    async def peer_connected(self, peer_id: str) -> None:
        """A peer connected: publish this node's record as soon as pubsub knows that the peer
        subscribes to the topic (a few round trips), so that it learns of this node at once."""
        peer = libp2p_id(peer_id)
        with trio.move_on_after(SUBSCRIPTION_WAIT):
            while peer not in self.fh.pubsub.peer_topics.get(HEALTH_TOPIC, ()):
                if not self.fh.is_connected(peer_id):
                    return  # gone already, or closed by this node (a peer it has blocked)
                await trio.sleep(0.02)
            self.changed()

    def _validate(self, forwarder: Any, msg: Any) -> bool:
        from libp2p.peer.id import ID

        try:
            author = ID(msg.from_id).to_base58()
        except Exception:
            return False
        if author == self.identity.peer_id:
            return True  # our own record, published or delivered back
        via = forwarder.to_base58() if forwarder is not None else author
        # A forwarder may name only so many strangers (peer IDs cost nothing; each one named
        # would be dialed and kept in the table). The author itself needs no introduction.
        if via != author and self.budget is not None and not self.known(author):
            if not self.budget.introduce(via, author):
                return False
        record = self.checker.check(author, msg.data, author_signed=bool(self.fh.pubsub.strict_signing))
        if record is None:
            if self.checker.last_reason and self.budget is not None and self.budget.on_violation is not None:
                # An honest forwarder validates before relaying: an invalid record is its doing.
                self.budget.on_violation(via, f"relayed an invalid health record: {self.checker.last_reason}")
            return False
        # Pubsub validates each message once (its seen-cache drops duplicates first), so the
        # record is taken here, verified once, rather than handed to the subscription reader.
        try:
            self.on_record(record)
        except Exception as exc:  # a bug of ours must not reach into pubsub's task
            log.error("taking a health record from %s failed: %s: %s", author, type(exc).__name__, exc)
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.fh.pubsub.set_topic_validator(HEALTH_TOPIC, self._validate, False)
        sub = await self.fh.pubsub.subscribe(HEALTH_TOPIC)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish)
            task_status.started()
            while True:
                await sub.get()  # the records were taken by the validator; keep the queue drained

    async def _publish(self) -> None:
        """Look at this node's record every ``interval``; sign and publish it when what it says
        changed, when ``changed()`` was called, or ``heartbeat`` after the last one."""
        seq = int(time.time() * 1000)  # increases across restarts, so peers accept the new run
        last_body: object = None
        last_at = -1e9
        while True:
            record = self.make_record(seq + 1)
            body = {**record.to_body(), "seq": 0, "ts": 0}  # what it says, not when
            now = trio.current_time()
            if self._force or body != last_body or now - last_at >= self.heartbeat - 1e-3:
                self._force = max(self._force - 1, 0)
                seq += 1
                try:
                    await self.fh.pubsub.publish(HEALTH_TOPIC, sign_record(record, self.identity))
                    self.published += 1
                except Exception as exc:
                    log.debug("health publish failed: %s", exc)
                last_body, last_at = body, now
            await trio.sleep_until(last_at + self.interval)  # never two records closer than this
            with trio.move_on_after(self.interval):  # look again then, or when a peer connects
                await self._wake.wait()
            self._wake = trio.Event()
