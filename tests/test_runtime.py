"""The node runtime with real processes: persisted queries across kill -9, cancellation, full
queues, users and the sysop's powers."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from rentahal.scripts.federation import Federation, NodeError, NodeProcess, connect

LONG = {"prompt": "tell me a long story", "ignore_eos": True}


def chat_node(federation: Federation, name: str, **settings: str) -> NodeProcess:
    base = {"realms.chat.max_tokens": "4000", "realms.chat.n_ctx": "4096"}
    return federation.start(name, serve="chat", settings={**base, **settings})


def sysop_token(node: NodeProcess) -> str:
    return (node.data_dir / "sysop.token").read_text().strip()


async def first_events(stream: Any, until: str) -> list[dict[str, Any]]:
    out = []
    async for msg in stream:
        out.append(msg)
        if (msg["op"] == "event" and msg["event"]["type"] == until) or msg["op"] in ("result", "error"):
            break
    return out


async def test_kill_9_with_queued_and_running_queries_loses_nothing(federation: Federation) -> None:
    node = chat_node(
        federation,
        "N",
        **{"realms.chat.queue_limit": "32", "router.local_queue_limit": "100"},
    )
    guid = uuid.uuid4().hex
    async with connect(node.ui, guid=guid) as client:
        ids = []
        for i in range(22):  # stream=False: lifecycle events only, no token flood
            payload = {**LONG, "max_tokens": 1000, "seed": i}
            first = await client.call("submit_query", realm="chat", payload=payload, stream=False)
            ids.append(first["event"]["query_id"])
        with trio.fail_after(30):
            while True:
                rows = (await client.call("history", limit=100))["history"]  # one consistent read
                statuses = {r["id"]: r["status"] for r in rows}
                if list(statuses.values()).count("running") == 1 and "done" not in statuses.values():
                    break
                await trio.sleep(0.02)  # pacing between polls of the stored state
        node.kill()  # kill -9
    running = {qid for qid, st in statuses.items() if st == "running"}
    waiting = [qid for qid, st in statuses.items() if st in ("queued", "routed")]
    assert len(running) == 1 and len(waiting) == 21, statuses  # 1 running (one llama context), 21 queued

    restarted = federation.start("N", serve="chat", settings=node.settings)
    restarted.wait_for(r"resumed 22 unfinished queries", 10)
    async with connect(restarted.ui, guid=guid, sysop_token=sysop_token(restarted)) as client:
        with trio.move_on_after(240):  # 22,000 tokens; a loaded machine took over 120 s
            while True:
                rows = (await client.call("history", limit=100))["history"]
                if sum(r["status"] == "done" for r in rows) == 22:
                    break
                await trio.sleep(0.5)  # pacing between polls of the stored state
        assert [r["status"] for r in rows] == ["done"] * 22, rows
        assert sorted(r["id"] for r in rows) == sorted(ids)
        for qid in ids:
            got = await client.call("get_query", query_id=qid)
            assert got["result"] is not None and got["result"]["stats"]["tokens"] == 1000
            statuses = [e["status"] for e in got["events"]]
            assert statuses.count("done") == 1, statuses
            assert "queued" in statuses
        # Every one ran again from the start on the restarted node (a run's steps are stored
        # with its end, so the interrupted runs left only their stored "queued").
        for qid in ids:
            events = (await client.call("get_query", query_id=qid))["events"]
            assert "resumed after restart" in [e["detail"] for e in events]
            assert [e["status"] for e in events].count("running") == 1
        stats = (await client.call("stats"))["stats"]["chat"]
        assert stats["served_local"] == 22 and stats["queue_depth"] == 0


async def test_cancelling_a_running_query_stops_generation_and_frees_the_slot(federation: Federation) -> None:
    node = chat_node(federation, "N")
    async with connect(node.ui, guid=uuid.uuid4().hex) as client:
        stream = client.stream("submit_query", realm="chat", payload={**LONG, "max_tokens": 4000})
        head = await first_events(stream, until="token")
        qid = next(m["event"]["query_id"] for m in head if m["event"]["type"] == "queued")
        answer = await client.call("cancel", query_id=qid)
        assert answer["cancelled"] is True
        rest = [m async for m in stream]
        tokens = sum(1 for m in head + rest if m.get("event", {}).get("type") == "token")
        assert rest[-1]["op"] == "error" and rest[-1]["code"] == "cancelled"
        assert 1 <= tokens < 4000
        got = await client.call("get_query", query_id=qid)
        assert got["query"]["status"] == "cancelled" and got["result"] is None
        # The slot is free: the next query runs at once.
        with trio.fail_after(30):
            msgs = [
                m async for m in client.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 8})
            ]
        assert msgs[-1]["op"] == "result"
        accepted = next(m["event"] for m in msgs if m.get("event", {}).get("type") == "accepted")
        assert accepted["position"] == 0
        stats = (await client.call("stats"))["stats"]["chat"]
        assert stats["cancelled"] == 1 and stats["served_local"] == 1
        with pytest.raises(NodeError) as err:
            await client.call("cancel", query_id=qid)
        assert err.value.code == "not_running"
    # Only its user or the sysop may cancel a query.
    async with connect(node.ui, guid=uuid.uuid4().hex) as owner, connect(node.ui, guid=uuid.uuid4().hex) as other:
        stream = owner.stream("submit_query", realm="chat", payload={**LONG, "max_tokens": 4000})
        head = await first_events(stream, until="token")
        qid = next(m["event"]["query_id"] for m in head if m["event"]["type"] == "queued")
        with pytest.raises(NodeError) as err:
            await other.call("cancel", query_id=qid)
        assert err.value.code == "forbidden"
        async with connect(node.ui, sysop_token=sysop_token(node)) as sysop:
            await sysop.call("cancel", query_id=qid)
        rest = [m async for m in stream]
        assert rest[-1]["code"] == "cancelled" and "sysop" in rest[-1]["message"]
    async with connect(node.ui, sysop_token=sysop_token(node)) as sysop:
        audit = (await sysop.call("audit"))["audit"]
    assert [(a["action"], a["target"]) for a in audit] == [("cancel_query", qid)]


async def _fill(client: Any, n: int) -> list[Any]:
    """Occupy the one slot and the one waiting place with long queries."""
    streams = []
    for _ in range(n):
        stream = client.stream("submit_query", realm="chat", payload={**LONG, "max_tokens": 4000})
        await first_events(stream, until="accepted")
        streams.append(stream)
    return streams


async def test_full_queue_sends_the_query_to_a_peer_or_says_queue_full(federation: Federation) -> None:
    """A full queue says when to come back: the query waits for a place, or goes to a peer
    meanwhile (it would fail queue_full only if no place freed up within its deadline: the
    router's tests show that)."""
    small = {"realms.chat.slots": "1", "realms.chat.queue_limit": "1"}
    alone = chat_node(federation, "alone", **small)
    async with connect(alone.ui) as client:
        await _fill(client, 2)
        msgs = [m async for m in client.stream("submit_query", realm="chat", payload={"prompt": "hi"})]
        # Refused queue_full at first, it came back after the retry-after until a place was free.
        assert msgs[-1]["op"] == "result" and msgs[-1]["result"]["attempt"] > 1, msgs[-1]
        assert msgs[-1]["result"]["executor"] == "local" and msgs[-1]["result"]["failovers"] == []

    helper = chat_node(federation, "helper")
    busy = federation.start(
        "busy",
        serve="chat",
        bootstrap=(helper.addr,),
        settings={"realms.chat.max_tokens": "4000", "realms.chat.n_ctx": "4096", **small},
    )
    busy.wait_for(rf"peer {helper.peer_id} is live \(serves: chat\)", 30)
    async with connect(busy.ui) as client:
        await _fill(client, 2)
        msgs = [m async for m in client.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 8})]
        assert msgs[-1]["op"] == "result", msgs[-1]
        result = msgs[-1]["result"]
        # Local said queue_full with a retry-after: the helper, ready now, answered meanwhile.
        assert result["executor"] == helper.peer_id and result["attempt"] == 2 and result["failovers"] == []
        assert not [m for m in msgs if m.get("event", {}).get("type") == "failover"]


async def test_bans_nicknames_and_sysop_token_are_enforced(federation: Federation) -> None:
    node = federation.start("N", serve="chat")
    guid = uuid.uuid4().hex
    async with connect(node.ui, guid=guid, nickname="alice") as alice:
        assert alice.welcome["nickname"] == "alice" and alice.welcome["sysop"] is False
        for bad in ("", "x" * 40, "<script>", " padded", "bob\n"):
            with pytest.raises(NodeError) as err:
                await alice.call("set_nickname", nickname=bad)
            assert err.value.code == "bad_request" and "nickname" in err.value.message
        for op, fields in (("ban", {"guid": guid}), ("users", {}), ("set_realm", {"realm": "chat", "enabled": False})):
            with pytest.raises(NodeError) as err:
                await alice.call(op, **fields)
            assert err.value.code == "forbidden" and "sysop token" in err.value.message
        msgs = [m async for m in alice.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 4})]
        assert msgs[-1]["op"] == "result"

    with pytest.raises(NodeError) as err:
        async with connect(node.ui, sysop_token="not-the-token"):
            pass
    assert err.value.code == "forbidden"

    # The sysop, through the CLI: ban alice; she is refused with the reason, and the ban is audited.
    res = await trio.to_thread.run_sync(lambda: node.cli("ban", guid, "--reason", "spamming"))
    assert f"banned {guid}" in res.stdout
    with pytest.raises(NodeError) as err:
        async with connect(node.ui, guid=guid):
            pass
    assert err.value.code == "banned" and "spamming" in err.value.message
    async with connect(node.ui) as anonymous:  # another user is unaffected
        msgs = [
            m async for m in anonymous.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 4})
        ]
        assert msgs[-1]["op"] == "result"
    users = await trio.to_thread.run_sync(lambda: node.cli_json("users"))
    me = next(u for u in users if u["guid"] == guid)
    assert me["banned"] and me["nickname"] == "alice" and me["queries"] == 1
    async with connect(node.ui, sysop_token=sysop_token(node)) as sysop:
        audit = (await sysop.call("audit"))["audit"]
        assert ("ban", guid, "spamming") in [(a["action"], a["target"], a["detail"]) for a in audit]
        with pytest.raises(NodeError) as err:
            await sysop.call("ban", guid="not-a-guid")
        assert err.value.code == "bad_request" and "guid" in err.value.message
    await trio.to_thread.run_sync(lambda: node.cli("unban", guid))
    async with connect(node.ui, guid=guid) as alice:
        msgs = [m async for m in alice.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 4})]
        assert msgs[-1]["op"] == "result"


async def test_sysop_disables_a_realm_and_blocks_a_peer_persistently(federation: Federation) -> None:
    a = federation.start("A", serve="none")
    b = federation.start("B", serve="chat", bootstrap=(a.addr,))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: chat\)", 30)
    mark = a.mark()
    await trio.to_thread.run_sync(lambda: b.cli("realm", "chat", "disable"))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: none\)", 15, after=mark)
    realms = await trio.to_thread.run_sync(lambda: b.cli_json("realms"))
    assert next(r for r in realms if r["realm"] == "chat")["local"]["status"] == "ready"
    plan = await trio.to_thread.run_sync(lambda: b.cli_json("route", "chat"))
    assert plan["excluded"][0] == {"executor": "local", "reason": "disabled by the sysop"}

    await trio.to_thread.run_sync(lambda: b.cli("realm", "chat", "enable"))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: chat\)", 15, after=mark)
    await trio.to_thread.run_sync(lambda: a.cli("peer", b.peer_id, "block"))
    assert (await trio.to_thread.run_sync(a.peer, b.peer_id))["state"] == "blocked"
    res = await trio.to_thread.run_sync(lambda: a.cli("query", "chat", "hi", check=False))
    assert res.returncode == 1 and "blocked by the sysop" in res.stderr

    # Both survive a restart.
    a.stop()
    a2 = federation.start("A", serve="none", bootstrap=(b.addr,))
    a2.wait_for(rf"peer {b.peer_id} is", 30)
    assert (await trio.to_thread.run_sync(a2.peer, b.peer_id))["state"] == "blocked"


async def test_hostile_websocket_clients_are_refused_and_the_node_stays_up(federation: Federation) -> None:
    node = federation.start("N", serve="chat")
    with trio.fail_after(60):
        await _hostile_clients(node)
    assert node.proc is not None and node.proc.poll() is None


async def _hostile_clients(node: NodeProcess) -> None:
    from trio_websocket import HandshakeError, open_websocket_url

    for origin in (b"http://[::1", b"https://evil.example", b"null"):
        with pytest.raises(HandshakeError):
            async with open_websocket_url(node.ui, extra_headers=[(b"Origin", origin)]):
                pass
    own = node.ui.replace("ws://", "http://").rstrip("/").encode()
    async with open_websocket_url(node.ui, extra_headers=[(b"Origin", own)]):
        pass  # the node's own page is welcome
    with pytest.raises(HandshakeError):  # another page on this machine is not
        async with open_websocket_url(node.ui, extra_headers=[(b"Origin", b"http://127.0.0.1:1")]):
            pass
    async with connect(node.ui, guid=uuid.uuid4().hex) as client:
        deep: dict[str, Any] = {"x": 1}
        for _ in range(12):
            deep = {"d": deep}
        with pytest.raises(NodeError) as err:
            await client.call("submit_query", realm="chat", payload={"prompt": "hi", "extra": deep})
        assert err.value.code == "bad_request"
        with pytest.raises(NodeError) as err:
            await client.call("submit_query", realm="chat", payload={"prompt": "hi", "img": {"$bytes": "%%%"}})
        assert err.value.code == "bad_request" and "base64" in err.value.message
        msgs = [m async for m in client.stream("submit_query", realm="chat", payload={"prompt": "hi", "max_tokens": 4})]
        assert msgs[-1]["op"] == "result"
