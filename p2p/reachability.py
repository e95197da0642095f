"""Can peers dial this node? A dial-back protocol, and the verdict it leads to.

``/rentahal/dialback/1.0.0``: a node asks a peer it is directly connected to "dial me back on
these ports". The peer dials **only the IP address it observes the request coming from** (so a
node can never use it to dial a third party), opens a fresh connection with a full Noise
handshake that must prove the requester's peer ID, closes it, and answers yes or no. A yes from
behind a home NAT is impossible without a port forward, so:

- ``public``: peers at distinct IP addresses dialed back (more yes than no): this node is
  reachable at the dialed address (the NAT's or the host's public address), which it then
  advertises;
- ``private``: peers answered no: behind a NAT or a firewall; the node reserves relay slots;
- ``unknown``: not enough answers yet (no direct peer, or only the ones on this very host).

A peer's answer is a claim like any other: a lying "yes" from one peer is outvoted by other
peers' "no", and the dialing side limits requests per peer. This is AutoNAT's idea (v1); the
library's AutoNAT service reuses the existing connection on dial-back, which proves nothing.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgpack
import trio

from ..node.limits import DIAL_BACK_ANSWER_TTL as ANSWER_TTL
from ..node.limits import DIAL_BACK_CONFIRMATIONS as CONFIRMATIONS
from ..node.limits import DIAL_BACK_LOOK_MAX, DIAL_BACK_TIMEOUT
from ..node.limits import DIAL_BACK_MAX_MESSAGE as MAX_MESSAGE
from ..node.limits import DIAL_BACK_MAX_PORTS as MAX_PORTS
from ..node.limits import DIAL_BACK_PER_PEER_INTERVAL as PER_PEER_INTERVAL
from ..node.limits import DIAL_BACK_REASK_AFTER as REASK_AFTER
from ..node.limits import DIAL_BACK_TICK as TICK
from ..node.limits import DIAL_BACK_WITNESSES as WITNESSES
from . import addrs as addrlib
from .host import FederationHost, libp2p_id

log = logging.getLogger("rentahal.p2p")

PROTOCOL_ID = "/rentahal/dialback/1.0.0"


class Reachability(str, enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass
class Verdict:
    """Answers heard, one per witness IP (its latest), each saying at which IP the witness saw
    this node and whether it could dial it there. Votes are counted per address seen: a home
    node that its LAN neighbours can dial but the internet cannot is not public."""

    answers: dict[str, tuple[bool, str, int, float]] = field(
        default_factory=dict
    )  # witness -> (dialed, seen ip, port, at)

    def add(self, witness_ip: str, dialed: bool, seen_ip: str, port: int, now: float) -> None:
        self.answers.pop(witness_ip, None)
        self.answers[witness_ip] = (dialed, seen_ip, port, now)
        while len(self.answers) > 16:
            self.answers.pop(next(iter(self.answers)))

    def expire(self, now: float) -> None:
        for w in [w for w, a in self.answers.items() if now - a[3] > ANSWER_TTL]:
            del self.answers[w]

    def _votes(self) -> dict[str, list[int]]:
        votes: dict[str, list[int]] = {}
        for dialed, seen_ip, _, _ in self.answers.values():
            votes.setdefault(seen_ip, [0, 0])[0 if dialed else 1] += 1
        return votes

    @property
    def state(self) -> Reachability:
        votes = self._votes()
        if not votes:
            return Reachability.UNKNOWN
        if any(no >= yes for yes, no in votes.values()):
            return Reachability.PRIVATE  # some peers see this node at an address they cannot dial
        return Reachability.PUBLIC

    @property
    def public_addrs(self) -> list[str]:
        """Addresses at least ``CONFIRMATIONS`` witnesses dialed this node back on."""
        if self.state is not Reachability.PUBLIC:
            return []
        count: dict[str, int] = {}
        for dialed, seen_ip, port, _ in self.answers.values():
            if dialed:
                addr = addrlib.tcp_addr(seen_ip, port)
                count[addr] = count.get(addr, 0) + 1
        return [a for a, n in count.items() if n >= CONFIRMATIONS]


def _ports(listening: Sequence[str]) -> list[int]:
    ports = []
    for a in listening:
        p = addrlib.parse(a)
        if p is not None and p.port and p.port not in ports:
            ports.append(p.port)
    return ports[:MAX_PORTS]


class DialBack:
    """Both sides of the dial-back protocol, and the running verdict, as one node service."""

    def __init__(self, fh: FederationHost) -> None:
        self.fh = fh
        self.verdict = Verdict()
        self.changed = trio.Event()
        self._asked_by: dict[str, float] = {}  # peer ID or IP -> when it last asked
        self._serving = trio.Semaphore(4)  # dial-backs in progress at once, for all peers

    @property
    def state(self) -> Reachability:
        return self.verdict.state

    # --- serving: dial a requester back ----------------------------------------------------------
    async def handle_stream(self, stream: object) -> None:
        s = stream  # an INetStream
        try:
            peer_id = s.muxed_conn.peer_id.to_base58()  # type: ignore[attr-defined]
            remote = s.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
            now = trio.current_time()
            keys = (peer_id, remote[0] if remote else "")  # peer IDs are free; IPs are not
            if any(now - self._asked_by.get(k, -1e9) < PER_PEER_INTERVAL for k in keys):
                await self._answer(s, {"ok": False, "error": "asked too often"})
                return
            for k in keys:
                self._asked_by[k] = now
            if len(self._asked_by) > 4096:
                self._asked_by = {k: v for k, v in self._asked_by.items() if now - v < PER_PEER_INTERVAL}
            with trio.fail_after(5):
                raw = await s.read(MAX_MESSAGE)  # type: ignore[attr-defined]
            req = msgpack.unpackb(raw, raw=False) if raw else None
            ports = req.get("ports") if isinstance(req, dict) else None
            if (
                not remote
                or not isinstance(ports, list)
                or not ports
                or len(ports) > MAX_PORTS
                or not all(isinstance(p, int) and 0 < p < 65536 for p in ports)
            ):
                await self._answer(s, {"ok": False, "error": "bad request"})
                return
            ip = remote[0]
            if "/p2p-circuit" in "".join(str(a) for a in (s.muxed_conn.get_transport_addresses() or ())):  # type: ignore[attr-defined]
                await self._answer(s, {"ok": False, "error": "asked over a relay"})
                return
            if self._serving.value == 0:
                await self._answer(s, {"ok": False, "error": "busy"})
                return
            ok, addr = False, ""
            async with self._serving:
                for port in ports:
                    addr = addrlib.tcp_addr(ip, port)
                    if await self._dial_back(addr, libp2p_id(peer_id)):
                        ok = True
                        break
            await self._answer(s, {"ok": ok, "addr": addr if ok else "", "seen_ip": ip})
        except Exception as exc:  # a peer's bad bytes or a dropped stream: its loss only
            log.debug("dialback request failed: %s", exc)
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                try:
                    await s.close()  # type: ignore[attr-defined]
                except Exception:
                    pass

    async def _answer(self, stream: object, msg: dict[str, object]) -> None:
        await stream.write(msgpack.packb(msg, use_bin_type=True))  # type: ignore[attr-defined]

    async def _dial_back(self, addr: str, peer: object) -> bool:
        """A fresh connection to ``addr`` whose Noise handshake proves it is ``peer``."""
        import multiaddr

        swarm = self.fh.host.get_network()
        conn = None
        with trio.move_on_after(DIAL_BACK_TIMEOUT):
            try:
                conn = await swarm._dial_addr_single_attempt(multiaddr.Multiaddr(addr), peer)
            except Exception as exc:
                log.debug("dialback to %s failed: %s", addr, exc)
        if conn is None:
            return False
        with trio.move_on_after(2) as cs:
            cs.shield = True
            try:
                await conn.close()
            except Exception:
                pass
        return True

    # --- asking: am I reachable? ---------------------------------------------------------------
    async def ask(self, peer_id: str) -> tuple[bool, str, int] | None:
        """(dialed back, the IP the peer saw this node at, the port it dialed) or None if it gave
        no usable answer. The address advertised later is built from these, never taken from
        the answer's own ``addr``; the port must be one asked for."""
        ports = _ports(self.fh.listen_addrs())
        if not ports:
            return None
        try:
            with trio.fail_after(DIAL_BACK_TIMEOUT):
                stream = await self.fh.host.new_stream(libp2p_id(peer_id), [PROTOCOL_ID])
            try:
                # No deadline around the write: a cancel inside a libp2p write breaks the
                # whole connection (DESIGN.md, cancel safety). The message is tiny.
                await stream.write(msgpack.packb({"ports": ports}, use_bin_type=True))
                with trio.fail_after(DIAL_BACK_TIMEOUT * MAX_PORTS + 5):
                    raw = await stream.read(MAX_MESSAGE)
            finally:
                with trio.move_on_after(1) as cs:
                    cs.shield = True
                    await stream.close()
            reply = msgpack.unpackb(raw, raw=False)
        except Exception as exc:
            log.debug("dialback via %s failed: %s", peer_id, exc)
            return None
        if not isinstance(reply, dict) or "error" in reply:
            return None
        ok, addr, ip = bool(reply.get("ok")), reply.get("addr", ""), reply.get("seen_ip", "")
        if (
            not isinstance(addr, str)
            or not isinstance(ip, str)
            or addrlib.scope(addrlib.tcp_addr(ip, 1)) in ("invalid", "unspecified", "loopback")
        ):
            return None
        parsed = addrlib.parse(addr) if ok else None
        if ok and (parsed is None or parsed.host != ip or parsed.port not in ports):
            return None  # "dialed you at" an address that is not the one it saw: a lie
        return ok, ip, parsed.port if parsed else ports[0]

    def witnesses(self) -> list[tuple[str, str]]:
        """Directly connected peers at other IP addresses than this host's: (peer, their IP)."""
        mine = set(self.fh.book.interfaces())
        out: dict[str, str] = {}
        for pid in sorted(self.fh.connected_peers()):
            facts = self.fh.connection(pid)
            if facts is None or facts[2] or not facts[0]:
                continue
            parsed = addrlib.parse(facts[0])
            if parsed is None or parsed.host in mine or addrlib.scope(facts[0]) == "loopback":
                continue
            out.setdefault(parsed.host, pid)
        return [(pid, ip) for ip, pid in out.items()]

    async def run(self) -> None:
        """Ask each new witness at once (a new direct connection from another IP), and every
        witness again after ``REASK_AFTER``. Looks when a connection comes or goes, when a
        witness is due again or an answer expires, never twice within ``TICK``."""
        asked: dict[str, float] = {}
        while True:
            change = self.fh.next_connection_change()
            now = trio.current_time()
            self.verdict.expire(now)
            witnesses = self.witnesses()
            due = [(pid, ip) for pid, ip in witnesses if now - asked.get(ip, -1e9) > REASK_AFTER]
            before = (self.state, tuple(self.verdict.public_addrs))
            for pid, ip in due[:WITNESSES]:
                asked[ip] = now
                answer = await self.ask(pid)
                if answer is not None:
                    self.verdict.add(ip, answer[0], answer[1], answer[2], trio.current_time())
                else:
                    asked[ip] = now - REASK_AFTER + 10.0  # no usable answer: try again soon
            if len(asked) > 1024:
                asked = {ip: t for ip, t in asked.items() if now - t < REASK_AFTER}
            after = (self.state, tuple(self.verdict.public_addrs))
            if after != before:
                log.info("reachability: %s%s", after[0].value, f" at {', '.join(after[1])}" if after[1] else "")
                self.changed.set()
                self.changed = trio.Event()
            if len(due) > WITNESSES:
                look_at = now + TICK
            else:
                look_at = min(
                    [now + DIAL_BACK_LOOK_MAX]
                    + [asked[ip] + REASK_AFTER for _, ip in witnesses if ip in asked]
                    + [a[3] + ANSWER_TTL for a in self.verdict.answers.values()]
                )
            with trio.move_on_at(look_at):
                await change.wait()
            await trio.sleep_until(now + TICK)
