"""Tests for the node identity (rentahal.p2p.identity) and signed health records (rentahal.p2p.health)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rentahal.p2p import identity as ident_mod
from rentahal.p2p.health import (
    MAX_REALMS,
    MAX_RECORD_BYTES,
    HealthRecord,
    HealthRecordError,
    RealmStatus,
    sign_record,
    verify_record,
)
from rentahal.p2p.identity import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    load_or_create_identity,
    peer_id_from_public_key,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -----------------------------------------------------------------------------------


def new_identity() -> Identity:
    return Identity(Ed25519PrivateKey.generate())


ME = new_identity()
OTHER = new_identity()


def full_record(identity: Identity = ME, **changes: Any) -> HealthRecord:
    fields: dict[str, Any] = dict(
        peer_id=identity.peer_id,
        seq=42,
        timestamp=1_750_000_000.25,
        realms=(
            RealmStatus("chat", "tiny-llama.gguf", False, 3, 2, 812.5, True),
            RealmStatus("vision", "", True, 0, 1, 0.0, False),
            RealmStatus("imagine", "sd-tiny", False, 10_000, 4096, 1e9, True),
        ),
        success_ratio=0.875,
        version="0.1.0",
        addrs=("/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4001"),
        node_name="basement-gpu",
    )
    fields.update(changes)
    return HealthRecord(**fields)


def good_body(identity: Identity = ME) -> dict[str, Any]:
    return full_record(identity).to_body()


def envelope(
    body: Any,
    signer: Identity = ME,
    *,
    key: bytes | None = None,
    sig: bytes | None = None,
    pack_body: bool = True,
) -> bytes:
    """A hand-built envelope whose signature is valid under ``signer`` unless told otherwise."""
    raw = msgpack.packb(body, use_bin_type=True) if pack_body else body
    return msgpack.packb(
        {
            "body": raw,
            "key": signer.public_bytes if key is None else key,
            "sig": signer.sign(raw) if sig is None else sig,
        },
        use_bin_type=True,
    )


def split(data: bytes) -> dict[str, bytes]:
    return msgpack.unpackb(data, raw=False)


# --- identity ----------------------------------------------------------------------------------


def test_peer_id_matches_libp2p() -> None:
    from libp2p.peer.id import ID

    for identity in [ME, OTHER, *(new_identity() for _ in range(4))]:
        theirs = ID.from_pubkey(identity.libp2p_key_pair().public_key).to_base58()
        assert identity.peer_id == theirs
        assert peer_id_from_public_key(identity.public_bytes) == theirs
        assert theirs.startswith("12D3KooW")


def test_libp2p_key_pair_is_the_same_key() -> None:
    pair = ME.libp2p_key_pair()
    assert pair.public_key.to_bytes() == ME.public_bytes
    data = b"signed by cryptography, checked by libp2p"
    assert pair.public_key.verify(data, ME.sign(data))


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_peer_id_rejects_wrong_key_length(length: int) -> None:
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"\x01" * length)


def test_b58encode_keeps_leading_zeros() -> None:
    assert ident_mod.b58encode(b"") == ""
    assert ident_mod.b58encode(b"\x00\x00\x01") == "112"
    assert ident_mod.b58encode(b"\xff") == "5Q"


def test_load_or_create_identity(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "node"  # does not exist yet
    first, created = load_or_create_identity(data_dir)
    assert created is True
    path = data_dir / IDENTITY_FILE
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not (data_dir / (IDENTITY_FILE + ".tmp")).exists()
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    second, created_again = load_or_create_identity(data_dir)
    assert created_again is False
    assert second.peer_id == first.peer_id
    assert second.public_bytes == first.public_bytes
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_load_or_create_identity_distinct_per_dir(tmp_path: Path) -> None:
    a, _ = load_or_create_identity(tmp_path / "a")
    b, _ = load_or_create_identity(tmp_path / "b")
    assert a.peer_id != b.peer_id


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage, not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_garbage_identity_file_raises(tmp_path: Path, content: bytes) -> None:
    (tmp_path / IDENTITY_FILE).write_bytes(content)
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)
    assert (tmp_path / IDENTITY_FILE).read_bytes() == content  # never overwritten


def test_non_ed25519_identity_file_raises(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / IDENTITY_FILE).write_bytes(pem)
    with pytest.raises(IdentityError, match="Ed25519"):
        load_or_create_identity(tmp_path)


# --- sign / verify round trip -------------------------------------------------------------------


def test_round_trip_all_fields() -> None:
    record = full_record()
    data = sign_record(record, ME)
    assert len(data) <= MAX_RECORD_BYTES
    back = verify_record(data)
    assert back == record
    assert back.realm("chat") == record.realms[0]
    assert back.realm("imagine").slots == 4096
    assert back.realm("speech") is None
    assert verify_record(data, author=ME.peer_id) == record


@pytest.mark.parametrize("n_realms", [0, 1, MAX_REALMS])
def test_round_trip_realm_counts(n_realms: int) -> None:
    realms = tuple(
        RealmStatus(f"realm-{i}", f"m{i}", i % 2 == 0, i, i + 1, float(i), i % 3 == 0) for i in range(n_realms)
    )
    record = full_record(realms=realms, addrs=(), node_name="", version="")
    assert verify_record(sign_record(record, ME)) == record


def test_round_trip_integer_numbers_come_back_as_floats() -> None:
    record = full_record(timestamp=1_700_000_000, success_ratio=1, realms=(RealmStatus("chat", service_ms=5),))
    back = verify_record(sign_record(record, ME))
    assert back == record
    assert isinstance(back.timestamp, float) and isinstance(back.success_ratio, float)
    assert isinstance(back.realms[0].service_ms, float)


def test_sign_refuses_someone_elses_record() -> None:
    with pytest.raises(ValueError):
        sign_record(full_record(OTHER), ME)


# --- rejections ---------------------------------------------------------------------------------


def test_tampered_body_byte_is_a_bad_signature() -> None:
    env = split(sign_record(full_record(), ME))
    for i in (0, len(env["body"]) // 2, len(env["body"]) - 1):
        body = bytearray(env["body"])
        body[i] ^= 0x01
        data = msgpack.packb({**env, "body": bytes(body)}, use_bin_type=True)
        with pytest.raises(HealthRecordError, match="bad signature"):
            verify_record(data)


def test_tampered_signature_or_swapped_key_is_rejected() -> None:
    env = split(sign_record(full_record(), ME))
    sig = bytearray(env["sig"])
    sig[5] ^= 0x80
    with pytest.raises(HealthRecordError, match="bad signature"):
        verify_record(msgpack.packb({**env, "sig": bytes(sig)}, use_bin_type=True))
    with pytest.raises(HealthRecordError, match="bad signature"):
        verify_record(msgpack.packb({**env, "key": OTHER.public_bytes}, use_bin_type=True))


def test_record_about_another_peer_signed_by_my_key_is_rejected() -> None:
    body = full_record(ME).to_body()
    body["peer"] = OTHER.peer_id
    data = envelope(body, ME)  # the signature itself is valid under my key
    with pytest.raises(HealthRecordError, match="not .*'s"):
        verify_record(data)
    with pytest.raises(HealthRecordError):
        verify_record(data, author=OTHER.peer_id)


def test_author_mismatch_is_rejected() -> None:
    data = sign_record(full_record(), ME)
    with pytest.raises(HealthRecordError, match="published by"):
        verify_record(data, author=OTHER.peer_id)


def test_oversized_data_is_rejected() -> None:
    record = full_record(node_name="x" * (MAX_RECORD_BYTES + 1))
    data = sign_record(record, ME)  # the signer does not check sizes; the reader must
    assert len(data) > MAX_RECORD_BYTES
    with pytest.raises(HealthRecordError, match="exceeds"):
        verify_record(data)
    with pytest.raises(HealthRecordError, match="exceeds"):
        verify_record(b"\x00" * (MAX_RECORD_BYTES + 1))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\x81\xa4body", bytes(range(256))],
    ids=["empty", "reserved-byte", "truncated-array", "truncated-str", "truncated-map", "noise"],
)
def test_non_msgpack_is_rejected(data: bytes) -> None:
    with pytest.raises(HealthRecordError):
        verify_record(data)


@pytest.mark.parametrize(
    "obj",
    [
        [1, 2, 3],
        "body",
        {"body": b"", "key": b""},
        {"body": b"", "key": b"", "sig": b"", "more": b""},
        {"body": "text", "key": b"k" * 32, "sig": b"s" * 64},
        {1: b"", 2: b"", 3: b""},
    ],
)
def test_bad_envelope_shapes_are_rejected(obj: Any) -> None:
    with pytest.raises(HealthRecordError):
        verify_record(msgpack.packb(obj, use_bin_type=True))


def test_body_that_is_not_msgpack_is_rejected() -> None:
    with pytest.raises(HealthRecordError, match="not msgpack"):
        verify_record(envelope(b"\xc1\xc1", pack_body=False))
    with pytest.raises(HealthRecordError, match="not a map"):
        verify_record(envelope([1, 2, 3]))


@pytest.mark.parametrize("key_len,sig_len", [(31, 64), (33, 64), (0, 64), (32, 63), (32, 65), (32, 0)])
def test_wrong_key_or_signature_length_is_rejected(key_len: int, sig_len: int) -> None:
    raw = msgpack.packb(good_body(), use_bin_type=True)
    key = (ME.public_bytes * 2)[:key_len]
    sig = (ME.sign(raw) * 2)[:sig_len]
    with pytest.raises(HealthRecordError, match="wrong length"):
        verify_record(envelope(raw, key=key, sig=sig, pack_body=False))


@pytest.mark.parametrize("missing", ["v", "peer", "seq", "ts", "realms", "ok", "ver", "addrs", "name"])
def test_missing_body_key_is_rejected(missing: str) -> None:
    body = good_body()
    del body[missing]
    with pytest.raises(HealthRecordError, match="body keys"):
        verify_record(envelope(body))


def test_extra_body_key_is_rejected() -> None:
    body = {**good_body(), "extra": 1}
    with pytest.raises(HealthRecordError, match="body keys"):
        verify_record(envelope(body))


def test_extra_bytes_body_key_is_rejected_not_a_crash() -> None:
    # Anyone can sign such a body with their own key: the signature is checked before the body.
    body = {**good_body(), b"extra": 1}
    with pytest.raises(HealthRecordError, match="string keys"):
        verify_record(envelope(body))


@pytest.mark.parametrize(
    "field,value",
    [
        ("seq", True),
        ("seq", False),
        ("seq", -1),
        ("seq", 2**63),
        ("seq", 1.0),
        ("seq", "1"),
        ("ts", True),
        ("ok", True),
        ("ts", -1.0),
        ("ts", 1e12),
        ("v", 2),
        ("v", "1"),
        ("peer", ""),
        ("peer", b"12D3KooW"),
        ("peer", "p" * 129),
        ("ver", "v" * 65),
        ("name", 7),
        ("addrs", "/ip4/1.2.3.4/tcp/1"),
        ("addrs", ["/ip4/1.2.3.4/tcp/1"] * 17),
        ("addrs", [""]),
        ("addrs", ["a" * 257]),
        ("realms", {"chat": 1}),
    ],
)
def test_bad_body_field_is_rejected(field: str, value: Any) -> None:
    body = {**good_body(), field: value}
    with pytest.raises(HealthRecordError):
        verify_record(envelope(body))


@pytest.mark.parametrize("value", [True, 1.0])
def test_record_version_must_be_the_integer_1(value: Any) -> None:
    body = {**good_body(), "v": value}
    with pytest.raises(HealthRecordError):
        verify_record(envelope(body))


@pytest.mark.parametrize(
    "index,value",
    [
        (3, True),  # queue_depth
        (4, True),  # slots
        (4, False),
        (4, 0),
        (4, 4097),
        (3, -1),
        (3, 10**7 + 1),
        (3, 1.5),
        (5, True),  # service_ms
        (5, -0.5),
        (5, float("nan")),
        (2, 1),  # smoke_test flag must be a bool
        (6, 0),  # gpu flag must be a bool
        (1, None),  # model
        (1, "m" * 257),
    ],
)
def test_bad_realm_field_is_rejected(index: int, value: Any) -> None:
    body = good_body()
    entry = list(body["realms"][0])
    entry[index] = value
    body["realms"][0] = entry
    with pytest.raises(HealthRecordError):
        verify_record(envelope(body))


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), float("-inf"), -0.01, 1.01])
def test_bad_success_ratio_is_rejected(ratio: float) -> None:
    data = sign_record(full_record(success_ratio=ratio), ME)
    with pytest.raises(HealthRecordError, match="ok must"):
        verify_record(data)


def test_too_many_realms_is_rejected() -> None:
    realms = tuple(RealmStatus(f"r{i}") for i in range(MAX_REALMS + 1))
    with pytest.raises(HealthRecordError, match="realms"):
        verify_record(sign_record(full_record(realms=realms), ME))


@pytest.mark.parametrize("name", ["", "Chat", "chat!", "ch at", "x" * 33, "chat\n", "ç"])
def test_bad_realm_name_is_rejected(name: str) -> None:
    record = full_record(realms=(RealmStatus(name),))
    with pytest.raises(HealthRecordError, match="bad realm name"):
        verify_record(sign_record(record, ME))


@pytest.mark.parametrize("entry", [["chat"], ["chat", "", False, 0, 1, 0.0, False, "8th"], "chat", None])
def test_bad_realm_entry_shape_is_rejected(entry: Any) -> None:
    body = {**good_body(), "realms": [entry]}
    with pytest.raises(HealthRecordError, match="7 fields"):
        verify_record(envelope(body))


# --- fuzzing ------------------------------------------------------------------------------------


@FAST
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_health_record_error(data: bytes) -> None:
    with pytest.raises(HealthRecordError):
        verify_record(data)


_VALID = sign_record(full_record(), ME)


@FAST
@given(st.data())
def test_mutated_record_is_always_rejected(data: st.DataObject) -> None:
    blob = bytearray(_VALID)
    positions = data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True))
    for i in positions:
        blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(HealthRecordError):
        verify_record(bytes(blob))


# Validly signed bodies of arbitrary shape: only HealthRecordError, never a crash. Map keys are
# str keys only here; mixed str/bytes keys have a test of their own above.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=8), st.dictionaries(st.text(max_size=8), kids, max_size=8)),
    max_leaves=30,
)


@FAST
@given(st.dictionaries(st.sampled_from(sorted(good_body()) + ["x"]), _values))
def test_signed_arbitrary_body_raises_only_health_record_error(fields: dict[str, Any]) -> None:
    body = {**good_body(), **fields}
    try:
        record = verify_record(envelope(body))
    except HealthRecordError:
        return
    # Accepted: then it is a well-typed record about the signer.
    assert record.peer_id == ME.peer_id
    assert isinstance(record.seq, int) and not isinstance(record.seq, bool)
    assert 0.0 <= record.success_ratio <= 1.0
    assert len(record.realms) <= MAX_REALMS


@FAST
@given(_values)
def test_signed_arbitrary_object_as_body_raises_only_health_record_error(obj: Any) -> None:
    with pytest.raises(HealthRecordError):
        verify_record(envelope(obj))
