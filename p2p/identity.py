"""The node's persistent Ed25519 identity, and the peer-ID arithmetic around it.

The key lives in ``<data dir>/identity.key`` (PKCS#8 PEM, mode 0600), so a node keeps its peer ID
across restarts. ``cryptography`` signs and verifies; libp2p gets the same key as its own KeyPair.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

IDENTITY_FILE = "identity.key"


class IdentityError(Exception):
    """The identity file exists but cannot be used."""


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    # Worked out once: gossip's validator compares every record's author with this node's ID.
    @functools.cached_property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @functools.cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def libp2p_key_pair(self) -> Any:  # libp2p.crypto.keys.KeyPair (imported lazily: libp2p is slow)
        from libp2p.crypto.ed25519 import create_new_key_pair

        return create_new_key_pair(self.private_key.private_bytes_raw())


def load_or_create_identity(data_dir: Path) -> tuple[Identity, bool]:
    """Return the node's identity and whether it was created just now."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        return load_identity(path), False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)
    return Identity(key), True


def load_identity(path: Path) -> Identity:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise IdentityError(f"{path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    return Identity(key)


def write_private_file(path: Path, data: bytes) -> None:
    """Write a secret atomically, readable by the owner only (mode 0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- peer IDs -------------------------------------------------------------------------------
# A libp2p peer ID for an Ed25519 key is the identity multihash of the protobuf-encoded public
# key: 0x00 (identity) 0x24 (36 bytes) | 0x08 0x01 (KeyType Ed25519) 0x12 0x20 (32 bytes) | key.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def peer_id_from_public_key(public_raw: bytes) -> str:
    if len(public_raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return b58encode(_ED25519_PEER_ID_PREFIX + public_raw)


def verify_signature(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + "".join(reversed(out))
