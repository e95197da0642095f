"""Signed health records: what a node says about itself on the gossip topic, about once a second.

A record is trusted only if its signature verifies under the public key it carries *and* that key
hashes to the peer ID it claims to describe (and, on gossip, to the peer that authored the
message). Everything else about it is hostile input: bounded, typed and range-checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import msgpack

from ..node.limits import MAX_RECORD_BYTES
from .identity import Identity, peer_id_from_public_key, verify_signature

HEALTH_TOPIC = "rentahal/health/1"
RECORD_VERSION = 1
MAX_REALMS = 16
MAX_ADDRS = 16

_REALM_RE = re.compile(r"[a-z0-9_-]{1,32}\Z")


class HealthRecordError(Exception):
    """A health record that must be ignored, with the reason."""


@dataclass(frozen=True)
class RealmStatus:
    name: str
    model: str = ""
    smoke_test: bool = False
    queue_depth: int = 0
    slots: int = 1
    service_ms: float = 0.0  # recent mean processing time
    gpu: bool = False


@dataclass(frozen=True)
class HealthRecord:
    peer_id: str
    seq: int
    timestamp: float  # unix time at the sender
    realms: tuple[RealmStatus, ...] = ()
    success_ratio: float = 1.0
    version: str = ""
    addrs: tuple[str, ...] = ()
    node_name: str = ""

    def realm(self, name: str) -> RealmStatus | None:
        return next((r for r in self.realms if r.name == name), None)

    def to_body(self) -> dict[str, object]:
        return {
            "v": RECORD_VERSION,
            "peer": self.peer_id,
            "seq": self.seq,
            "ts": self.timestamp,
            "realms": [
                [r.name, r.model, r.smoke_test, r.queue_depth, r.slots, r.service_ms, r.gpu] for r in self.realms
            ],
            "ok": self.success_ratio,
            "ver": self.version,
            "addrs": list(self.addrs),
            "name": self.node_name,
        }


def sign_record(record: HealthRecord, identity: Identity) -> bytes:
    if record.peer_id != identity.peer_id:
        raise ValueError("a node signs only its own health record")
    body = msgpack.packb(record.to_body(), use_bin_type=True)
    signed: bytes = msgpack.packb(
        {"body": body, "key": identity.public_bytes, "sig": identity.sign(body)}, use_bin_type=True
    )
    return signed


def verify_record(data: bytes, *, author: str | None = None, author_signed: bool = False) -> HealthRecord:
    """Decode and verify a signed record; ``author`` is the gossip message's signer, if known.

    ``author_signed``: the bytes arrived in a GossipSub message whose signature by ``author``
    pubsub has verified already (strict signing), so the record's own signature by the same key
    would only be checked a second time; the key must still be ``author``'s."""
    if len(data) > MAX_RECORD_BYTES:
        raise HealthRecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    envelope = _unpack(data)
    if not isinstance(envelope, dict) or set(envelope) != {"body", "key", "sig"}:
        raise HealthRecordError("envelope is not {body, key, sig}")
    body, key, sig = envelope["body"], envelope["key"], envelope["sig"]
    if not (isinstance(body, bytes) and isinstance(key, bytes) and isinstance(sig, bytes)):
        raise HealthRecordError("envelope fields must be bytes")
    if len(key) != 32 or len(sig) != 64:
        raise HealthRecordError("key or signature has the wrong length for Ed25519")
    if not (author_signed and author is not None) and not verify_signature(key, sig, body):
        raise HealthRecordError("bad signature")
    try:
        record = _parse_body(_unpack(body))
    except HealthRecordError:
        raise
    except Exception as exc:  # hostile input must only ever be "ignored", never a crash
        raise HealthRecordError(f"unparseable body: {type(exc).__name__}") from None
    if peer_id_from_public_key(key) != record.peer_id:
        raise HealthRecordError(f"signed by a key that is not {record.peer_id}'s")
    if author is not None and author != record.peer_id:
        raise HealthRecordError(f"record about {record.peer_id} published by {author}")
    return record


def _unpack(data: bytes) -> object:
    try:
        # The caller bounds ``data`` to MAX_RECORD_BYTES, which bounds every object in it.
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise HealthRecordError(f"not msgpack: {type(exc).__name__}") from None


def _parse_body(body: object) -> HealthRecord:
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise HealthRecordError("body is not a map with string keys")
    expected = {"v", "peer", "seq", "ts", "realms", "ok", "ver", "addrs", "name"}
    if set(body) != expected:
        raise HealthRecordError(f"body keys {sorted(body)} are not {sorted(expected)}")
    if type(body["v"]) is not int or body["v"] != RECORD_VERSION:
        raise HealthRecordError(f"unsupported record version {body['v']!r}")
    peer = _text(body["peer"], "peer", 128)
    seq = _int(body["seq"], "seq", 0, 2**63 - 1)
    ts = _float(body["ts"], "ts", 0.0, 1e11)
    ok = _float(body["ok"], "ok", 0.0, 1.0)
    realms_raw = body["realms"]
    if not isinstance(realms_raw, list) or len(realms_raw) > MAX_REALMS:
        raise HealthRecordError(f"realms must be a list of at most {MAX_REALMS}")
    realms = tuple(_parse_realm(r) for r in realms_raw)
    addrs_raw = body["addrs"]
    if not isinstance(addrs_raw, list) or len(addrs_raw) > MAX_ADDRS:
        raise HealthRecordError(f"addrs must be a list of at most {MAX_ADDRS}")
    addrs = tuple(_text(a, "addrs[]", 256) for a in addrs_raw)
    return HealthRecord(
        peer_id=peer,
        seq=seq,
        timestamp=ts,
        realms=realms,
        success_ratio=ok,
        version=_text(body["ver"], "ver", 64, allow_empty=True),
        addrs=addrs,
        node_name=_text(body["name"], "name", 64, allow_empty=True),
    )


def _parse_realm(raw: object) -> RealmStatus:
    if not isinstance(raw, list) or len(raw) != 7:
        raise HealthRecordError("a realm entry is a list of 7 fields")
    name, model, smoke, depth, slots, service_ms, gpu = raw
    if not isinstance(name, str) or not _REALM_RE.match(name):
        raise HealthRecordError(f"bad realm name {name!r}")
    if not isinstance(smoke, bool) or not isinstance(gpu, bool):
        raise HealthRecordError("realm flags must be booleans")
    return RealmStatus(
        name=name,
        model=_text(model, "realm.model", 256, allow_empty=True),
        smoke_test=smoke,
        queue_depth=_int(depth, "realm.queue_depth", 0, 10**7),
        slots=_int(slots, "realm.slots", 1, 4096),
        service_ms=_float(service_ms, "realm.service_ms", 0.0, 1e9),
        gpu=gpu,
    )


def _text(v: object, name: str, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or len(v) > max_len or (not v and not allow_empty):
        raise HealthRecordError(f"{name} must be a string of at most {max_len} chars")
    return v


def _int(v: object, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise HealthRecordError(f"{name} must be an integer in {lo}..{hi}")
    return v


def _float(v: object, name: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise HealthRecordError(f"{name} must be a number")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise HealthRecordError(f"{name} must be in {lo}..{hi}")
    return f
