"""Answers checked, not trusted: seeded canary queries that catch a peer answering junk.

A peer's health record says which model it runs; nothing proves it, and a well-formed junk
answer looks like a success to the router. So now and then this node sends a peer a canary: an
ordinary-looking query made deterministic (greedy decoding with a fixed seed; a fixed diffusion
seed; a fixed text to speak), drawn fresh from a random seed each time so that a liar cannot
learn the canaries. The answer is compared with a reference:

- this node's own answer, where it serves the realm with the model the peer claims;
- else the answers of up to two other peers claiming the same model, asked at the same moment.
  The suspect is caught when it disagrees with every reference and the references agree with
  each other (or the one reference has passed a check before); agreeing with a reference clears
  both. With no reference at all nothing can be judged, and nothing is.

A peer caught is blocked (out of routing, with the reason in ``peers`` and ``route --explain``)
for CAUGHT_BLOCK seconds; passing a check makes a peer *proven* (ranked ahead of strangers). New
peers are checked soon after they connect, every peer again every ``every`` seconds (with
jitter), and at once when a user reports one of its answers as wrong.
"""

from __future__ import annotations

import logging
import random
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..node.limits import CANARY_DEADLINE, CAUGHT_BLOCK, FIRST_CHECK_DELAY
from ..node.limits import SPOT_CHECKS_IN_FLIGHT as MAX_PARALLEL
from ..p2p.peers import PeerState, PeerTable
from . import events as ev
from .catalog import CATALOG
from .router import Query

log = logging.getLogger("rentahal.spotcheck")

_WORDS = [
    "river",
    "stone",
    "lamp",
    "orbit",
    "cedar",
    "violet",
    "engine",
    "harbor",
    "quiet",
    "ladder",
    "maple",
    "signal",
    "copper",
    "meadow",
    "lantern",
    "thunder",
    "pepper",
    "canvas",
    "marble",
    "window",
    "falcon",
    "garden",
    "silver",
    "rocket",
    "velvet",
    "anchor",
]

RunRemote = Callable[[str, Query], Awaitable[ev.Result]]
RunLocal = Callable[[Query], Awaitable[ev.Result]]


def _png(seed: int, size: int = 16) -> bytes:
    """A small RGB PNG whose pixels follow from ``seed`` (no imaging library needed)."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(3 * size)) for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def canary(realm: str, seed: int) -> dict[str, Any] | None:
    """A deterministic query for ``realm`` built from ``seed`` (the realm's own canary builder,
    named in its catalog entry); None if the realm is unknown."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9)))
    definition = CATALOG.get(realm)
    return definition.canary_payload(words, seed % 2**31) if definition is not None else None


def canary_image(seed: int) -> bytes:
    """A small random PNG for a vision canary."""
    return _png(seed)


def agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two answers to the same canary agree: texts equal (whitespace aside) or one the
    start of the other (hardware may end greedy decoding a token apart); images close pixel by
    pixel; audio of about the same length."""
    if "text" in a or "text" in b:
        x, y = " ".join(str(a.get("text", "")).split()), " ".join(str(b.get("text", "")).split())
        return x == y or (min(len(x), len(y)) >= 8 and (x.startswith(y) or y.startswith(x)))
    if "image" in a or "image" in b:
        return _images_close(a.get("image"), b.get("image"))
    if "audio" in a or "audio" in b:
        la, lb = len(a.get("audio") or b""), len(b.get("audio") or b"")
        return la > 0 and lb > 0 and abs(la - lb) <= 0.1 * max(la, lb)
    return a == b


def _images_close(a: Any, b: Any) -> bool:
    if not isinstance(a, (bytes, bytearray)) or not isinstance(b, (bytes, bytearray)):
        return False
    if a == b:
        return True
    try:
        import io

        from PIL import Image

        def small(data: bytes) -> list[int]:
            with Image.open(io.BytesIO(data)) as im:
                return list(im.convert("L").resize((16, 16)).getdata())

        pa, pb = small(bytes(a)), small(bytes(b))
    except Exception:  # not decodable (junk), or no imaging library: not the same image
        return False
    return sum(abs(x - y) for x, y in zip(pa, pb, strict=False)) / len(pa) <= 16.0


@dataclass
class Verdict:
    peer_id: str
    realm: str
    outcome: str  # "pass", "caught", "inconclusive"
    detail: str = ""


class SpotChecker:
    def __init__(
        self,
        table: PeerTable,
        *,
        self_id: str,
        run_remote: RunRemote,
        run_local: RunLocal,
        local_model: Callable[[str], str | None],
        every: float,
        clock: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
    ) -> None:
        self.table = table
        self.self_id = self_id
        self.run_remote = run_remote
        self.run_local = run_local
        self.local_model = local_model  # the model this node serves a realm with, if it does
        self.every = every
        self.clock = clock
        self.rng = rng or random.Random()
        self._due: dict[tuple[str, str], float] = {}  # (peer, realm) -> when to check next
        self._urgent: set[str] = set()
        self._running: set[tuple[str, str]] = set()
        self.checks = 0  # canaries sent (to peers and to this node's own models)
        self.caught = 0
        self.verdicts: list[Verdict] = []  # the last few, for tests and reports
        self._wake = trio.Event()

    def check_now(self, peer_id: str) -> None:
        """A user says an answer of ``peer_id`` was wrong: check it at the next look."""
        self._urgent.add(peer_id)
        self._wake.set()

    def _model(self, peer_id: str, realm: str) -> str | None:
        e = self.table.get(peer_id)
        status = e.record.realm(realm) if e is not None and e.record is not None else None
        return status.model if status is not None else None

    def due(self) -> list[tuple[str, str]]:
        """(peer, realm) pairs whose check is due now."""
        now = self.clock()
        out = []
        for e in self.table:
            if e.record is None or self.table.state(e) is not PeerState.LIVE:
                continue
            for status in e.record.realms:
                key = (e.peer_id, status.name)
                if key in self._running or status.name not in CATALOG:  # a realm with no canary
                    continue
                at = self._due.get(key)
                if at is None:  # first seen: soon, at a moment the peer cannot predict
                    at = self._due[key] = now + self.rng.uniform(*FIRST_CHECK_DELAY)
                if (self.every > 0 and now >= at) or e.peer_id in self._urgent:
                    out.append(key)
        self._urgent.clear()
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limit = trio.CapacityLimiter(MAX_PARALLEL)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:  # every <= 0: only the peers users report are checked
                for key in self.due():
                    self._running.add(key)
                    nursery.start_soon(self._check_guarded, key, limit)
                with trio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _check_guarded(self, key: tuple[str, str], limit: trio.CapacityLimiter) -> None:
        peer_id, realm = key
        try:
            async with limit:
                verdict = await self.check(peer_id, realm)
            self.verdicts = [*self.verdicts[-31:], verdict]
        except Exception as exc:  # a check that could not run judges nobody
            log.debug("spot-check of %s (%s) did not run: %s", peer_id, realm, exc)
        finally:
            self._running.discard(key)
            self._due[key] = self.clock() + max(self.every, 1.0) * self.rng.uniform(0.75, 1.25)

    async def _ask(self, executor: str, realm: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        # An id like any other query's: a canary must not be told apart from a user's query.
        query = Query(uuid.uuid4().hex, realm, payload, CANARY_DEADLINE, self.self_id)
        self.checks += 1
        try:
            with trio.fail_after(CANARY_DEADLINE + 5):
                result = await (self.run_local(query) if executor == "local" else self.run_remote(executor, query))
        except (ev.QueryError, trio.TooSlowError) as exc:
            log.debug("canary on %s failed: %s", executor, exc)
            return None  # a failure is the router's business; a wrong answer is ours
        return dict(result.output) if isinstance(result.output, dict) else None

    async def check(self, peer_id: str, realm: str) -> Verdict:
        """Send ``peer_id`` a fresh canary for ``realm`` and judge its answer."""
        model = self._model(peer_id, realm)
        payload = canary(realm, self.rng.getrandbits(62))
        assert payload is not None
        refs: list[str] = []
        if model is not None and self.local_model(realm) == model:
            refs = ["local"]
        else:
            others = [
                e
                for e in self.table
                if e.peer_id != peer_id
                and self._model(e.peer_id, realm) == model
                and self.table.state(e) is PeerState.LIVE
            ]
            others.sort(key=lambda e: (not e.spot_passed, self.rng.random()))
            refs = [e.peer_id for e in others[:2]]
        if not refs:
            return Verdict(peer_id, realm, "inconclusive", f"nobody else serves {model!r}")
        answers: dict[str, dict[str, Any] | None] = {}

        async def ask(executor: str) -> None:
            answers[executor] = await self._ask(executor, realm, payload)

        async with trio.open_nursery() as nursery:
            for executor in [peer_id, *refs]:
                nursery.start_soon(ask, executor)
        mine = answers.get(peer_id)
        good = {r: a for r, a in answers.items() if r != peer_id and a is not None}
        if mine is None or not good:
            return Verdict(peer_id, realm, "inconclusive", "no answer to compare")
        matching = [r for r, a in good.items() if agree(mine, a)]
        if matching:
            self.table.record_spot_pass(peer_id)
            for r in matching:
                if r != "local":
                    self.table.record_spot_pass(r)
            return Verdict(peer_id, realm, "pass")
        trusted = (
            "local" in good
            or (len(good) >= 2 and all(agree(a, b) for a in good.values() for b in good.values()))
            or any(getattr(self.table.get(r), "spot_passed", False) for r in good)
        )
        if not trusted:
            return Verdict(peer_id, realm, "inconclusive", "the references disagree")
        reference = "this node's own model" if "local" in good else f"{len(good)} peer(s) serving the same model"
        reason = f"answered a {realm} spot-check wrong (against {reference})"
        self.caught += 1
        self.table.record_caught(peer_id, CAUGHT_BLOCK, reason)
        log.warning("peer %s %s; blocked for %gs", peer_id, reason, CAUGHT_BLOCK)
        return Verdict(peer_id, realm, "caught", reason)
