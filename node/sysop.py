"""The sysop's actions, each stored, applied and written to the audit log in one place.

The person running the node (the holder of ``sysop.token``) bans and unbans users, turns realms
off and on, blocks peers and cancels other users' queries; every one of those is audited (the
``audit`` op and command read the log back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .apikeys import ApiKeys
from .queries import QueryManager, Refused, check_guid
from .storage import Storage

log = logging.getLogger("rentahal.sysop")


class Sysop:
    def __init__(
        self,
        storage: Storage,
        queries: QueryManager,
        *,
        realm_enabled: Callable[[str, bool], None],
        peer_blocked: Callable[[str, bool], None],
    ) -> None:
        self.storage = storage
        self.queries = queries
        self._realm_enabled = realm_enabled  # applies it to the running node
        self._peer_blocked = peer_blocked

    async def ban(self, guid: str, banned: bool, reason: str = "") -> None:
        guid = check_guid(guid)
        if not await self.storage.set_banned(guid, banned, reason):
            raise Refused("not_found", f"no user {guid}")
        self.queries.ban_changed(guid, banned, reason if banned else "")
        await self.storage.audit("sysop", "ban" if banned else "unban", guid, reason)
        log.info("sysop: %s user %s%s", "banned" if banned else "unbanned", guid, f" ({reason})" if reason else "")

    async def set_realm_enabled(self, realm: str, enabled: bool) -> None:
        await self.storage.set_realm_enabled(realm, enabled)
        self._realm_enabled(realm, enabled)
        await self.storage.audit("sysop", "enable_realm" if enabled else "disable_realm", realm)
        log.info("sysop: realm %s %s", realm, "enabled" if enabled else "disabled")

    async def set_peer_blocked(self, peer_id: str, blocked: bool) -> None:
        if not peer_id or len(peer_id) > 128 or not peer_id.isalnum():
            raise Refused("bad_request", "peer_id must be a base58 libp2p peer ID")
        await self.storage.set_peer_blocked(peer_id, blocked)
        self._peer_blocked(peer_id, blocked)
        await self.storage.audit("sysop", "block_peer" if blocked else "unblock_peer", peer_id)
        log.info("sysop: peer %s %s", peer_id, "blocked" if blocked else "unblocked")

    async def cancel(self, query_id: str, *, by_guid: str | None, sysop: bool) -> None:
        """A user cancels their own query; the sysop anyone's, which is audited."""
        if await self.queries.cancel(query_id, by_guid=by_guid, sysop=sysop):  # another user's
            await self.storage.audit("sysop", "cancel_query", query_id)

    async def create_key(self, keys: ApiKeys, name: str) -> dict[str, Any]:
        user, key = await keys.create(name)
        await self.storage.audit("sysop", "create_api_key", user.key_id, name)
        return {"id": user.key_id, "name": user.name, "user": user.user_guid, "key": key}

    async def revoke_key(self, keys: ApiKeys, key_id: str) -> bool:
        revoked = await keys.revoke(key_id)
        if revoked:
            await self.storage.audit("sysop", "revoke_api_key", key_id)
        return revoked

    async def users(self) -> list[dict[str, Any]]:
        return await self.storage.list_users()

    async def audit_log(self) -> list[dict[str, Any]]:
        return await self.storage.audit_log()
