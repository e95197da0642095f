"""Health gossip: publish this node's signed record about once a second; take others' records,
validated **before** GossipSub relays them onward.

The topic validator runs inside the pubsub router, ahead of forwarding: a record that does not
verify under its author's key, names another peer than the message's author, carries a timestamp
far from this clock, or repeats a sequence number already seen from that author (a replay) is
rejected, so this node never spreads it. An accepted record reaches the peer table from the
validator itself (pubsub validates each message once). Rejections are logged once per (author, reason), with a bound on the memory used.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from .health import HEALTH_TOPIC, HealthRecord, sign_record, verify_record
from .host import FederationHost
from .identity import Identity

log = logging.getLogger("rentahal.p2p")

MAX_RECORD_SKEW = 120.0  # seconds between a record's timestamp and this clock
MAX_AUTHORS = 5000
MAX_WARNINGS = 1000


class RecordCheck:
    """The validator's state: last sequence number per author (bounded, least recent dropped)."""

    def __init__(self, self_id: str, *, clock: Callable[[], float] = time.time) -> None:
        self.self_id = self_id
        self.clock = clock
        self._last_seq: OrderedDict[str, int] = OrderedDict()
        self._warned: set[tuple[str, str]] = set()
        self.rejected = 0

    def check(self, author: str, data: bytes) -> HealthRecord | None:
        """The verified record, or None (and one log line per author and reason)."""
        try:
            record = verify_record(data, author=author)
        except Exception as exc:  # HealthRecordError, or a bug: never let gossip kill the node
            return self._reject(author, str(exc))
        skew = abs(record.timestamp - self.clock())
        if skew > MAX_RECORD_SKEW:
            return self._reject(author, f"timestamp {skew:.0f}s off this clock (replayed, or a clock far off)")
        last = self._last_seq.get(author)
        if last is not None and record.seq <= last:
            return self._reject(author, f"sequence {record.seq} not after {last} (replayed)", quiet=True)
        self._last_seq[author] = record.seq
        self._last_seq.move_to_end(author)
        while len(self._last_seq) > MAX_AUTHORS:
            self._last_seq.popitem(last=False)
        return record

    def _reject(self, author: str, reason: str, *, quiet: bool = False) -> None:
        self.rejected += 1
        key = (author, reason.split(" ", 1)[0])
        if not quiet and key not in self._warned and len(self._warned) < MAX_WARNINGS:
            self._warned.add(key)
            log.warning("ignored health record from %s: %s", author, reason)
        return None


class HealthGossip:
    def __init__(
        self,
        fh: FederationHost,
        identity: Identity,
        *,
        interval: float,
        make_record: Callable[[int], HealthRecord],
        on_record: Callable[[HealthRecord], None],
    ) -> None:
        self.fh = fh
        self.identity = identity
        self.interval = interval
        self.make_record = make_record
        self.on_record = on_record
        self.checker = RecordCheck(identity.peer_id)

    def _validate(self, forwarder: Any, msg: Any) -> bool:
        from libp2p.peer.id import ID

        try:
            author = ID(msg.from_id).to_base58()
        except Exception:
            return False
        if author == self.identity.peer_id:
            return True  # our own record, published or delivered back
        record = self.checker.check(author, msg.data)
        if record is None:
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
        seq = int(time.time() * 1000)  # increases across restarts, so peers accept the new run
        while True:
            seq += 1
            try:
                await self.fh.pubsub.publish(HEALTH_TOPIC, sign_record(self.make_record(seq), self.identity))
            except Exception as exc:
                log.debug("health publish failed: %s", exc)
            await trio.sleep(self.interval)
