"""API keys: bearer tokens the sysop hands out for the OpenAI-compatible API.

A key is ``rh-<id>-<secret>``: the id (8 hex digits) names it in lists, the audit log and
``keys revoke``; the secret is 32 random bytes (base64url). Only the key's SHA-256 is stored
(a key is 256 random bits, so a fast hash is enough: there is nothing to guess). Each key is
a user of its own — its history, costs, bans and rate limit are that user's — under a GUID
derived from its id. Looked-up keys are cached in memory; a revoke takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .queries import Refused

if TYPE_CHECKING:
    from .storage import Storage

KEY_RE = re.compile(r"rh-([0-9a-f]{8})-[A-Za-z0-9_\-]{43}\Z")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.@\-]{0,62}\Z")
MAX_CACHED = 4096
_GUID_NAMESPACE = uuid.UUID("6f1c2d0e-5b1a-4c39-9a55-2f0e3d6b7a10")


@dataclass(frozen=True)
class KeyUser:
    key_id: str
    name: str
    user_guid: str


def key_user_guid(key_id: str) -> str:
    """The user a key acts as: stable, and not a GUID a websocket client could pick by chance."""
    return uuid.uuid5(_GUID_NAMESPACE, f"api-key:{key_id}").hex


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeys:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._cache: dict[str, KeyUser | None] = {}  # digest -> its user, or None: not a live key
        self._generation = 0  # bumped by every revoke: a lookup begun before it is not cached

    async def create(self, name: str) -> tuple[KeyUser, str]:
        """A new key; the key itself is returned once and never stored."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise Refused("bad_request", "key name must be 1-63 characters: letters, digits, space, _ . @ -")
        key_id = secrets.token_hex(4)
        key = f"rh-{key_id}-{secrets.token_urlsafe(32)}"
        user = KeyUser(key_id, name, key_user_guid(key_id))
        await self.storage.add_api_key(key_id, name, digest(key), user.user_guid)
        await self.storage.ensure_user(user.user_guid, name[:32].strip() or None)
        return user, key

    async def list(self) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.storage.api_keys()]

    async def revoke(self, key_id: str) -> bool:
        if not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{8}", key_id):
            raise Refused("bad_request", "key id must be 8 hex digits (as `keys list` shows it)")
        revoked = await self.storage.revoke_api_key(key_id)
        self._generation += 1
        self._cache.clear()  # the revoked key's digest is unknown here: forget every lookup
        return revoked

    async def check(self, key: str) -> KeyUser | None:
        """The user of a live key, or None (unknown, malformed or revoked)."""
        if not KEY_RE.match(key):
            return None
        d = digest(key)
        if d in self._cache:
            return self._cache[d]
        generation = self._generation
        row = await self.storage.api_key(d)
        user = None
        if row is not None and row["revoked_at"] is None and hmac.compare_digest(row["hash"], d):
            user = KeyUser(row["id"], row["name"], row["user_guid"])
        if generation == self._generation:  # no revoke meanwhile: the answer still holds
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[d] = user
        return user
