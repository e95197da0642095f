"""Spot-checks: a peer answering well-formed junk is caught by canary queries and excluded, and a
user can report an answer as wrong. Unit tests of the judge, then real node processes facing an
in-process liar that claims the honest executors' model, a GPU and 64 free slots."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.cli import _short as short
from rentahal.p2p import wire
from rentahal.p2p.health import HEALTH_TOPIC, HealthRecord, RealmStatus, sign_record
from rentahal.p2p.host import FederationHost
from rentahal.p2p.identity import Identity
from rentahal.p2p.peers import PeerState, PeerTable
from rentahal.realms import events as ev
from rentahal.realms.router import Query
from rentahal.realms.spotcheck import SpotChecker, agree, canary
from rentahal.scripts.federation import Federation, NodeProcess

from .hostile import frames, stranger

# --- the judge, without sockets -----------------------------------------------------------------


def test_canaries_are_deterministic_per_seed_and_differ_across_seeds() -> None:
    for realm in ("chat", "vision", "imagine", "speech"):
        assert canary(realm, 7) == canary(realm, 7)
        assert canary(realm, 7) != canary(realm, 8)
    assert canary("chat", 1)["temperature"] == 0.0  # greedy: the same model gives the same text
    assert canary("vision", 1)["image"].startswith(b"\x89PNG")
    assert canary("nonsense", 1) is None


def test_answers_agree_on_text_prefixes_but_not_on_junk() -> None:
    assert agree({"text": "the river runs"}, {"text": "the  river runs"})
    assert agree({"text": "the river runs far"}, {"text": "the river runs"})  # a token apart
    assert not agree({"text": "the river runs"}, {"text": "junk junk junk"})
    assert not agree({"text": "ab"}, {"text": "abc"})  # too short to call a prefix agreement
    assert agree({"audio": b"x" * 1000}, {"audio": b"y" * 1050})
    assert not agree({"audio": b"x" * 1000}, {"audio": b"y" * 3000})
    assert not agree({"image": b"\x89PNGjunk"}, {"image": b"\x89PNGother"})


A, B, C, LIAR = (Identity(Ed25519PrivateKey.generate()).peer_id for _ in range(4))


def _table() -> PeerTable:
    table = PeerTable(
        "me",
        stale_after=1e6,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=300.0,
        clock=trio.current_time,
    )
    for _i, peer in enumerate((A, B, C, LIAR)):
        table.apply_record(
            HealthRecord(peer_id=peer, seq=1, timestamp=time.time(), realms=(RealmStatus("chat", "tiny.gguf"),))
        )
        table.set_connected(peer, True)
    return table


def _checker(table: PeerTable, answers: dict[str, str], *, local_model: str | None = None) -> SpotChecker:
    async def remote(peer_id: str, query: Query) -> ev.Result:
        return ev.Result(output={"text": answers[peer_id] + query.payload["prompt"]}, stats={})

    async def local(query: Query) -> ev.Result:
        return ev.Result(output={"text": answers["local"] + query.payload["prompt"]}, stats={})

    return SpotChecker(
        table, self_id="me", run_remote=remote, run_local=local, local_model=lambda realm: local_model, every=60.0
    )


async def test_a_liar_is_caught_against_two_agreeing_peers_and_they_are_proven() -> None:
    table = _table()
    spot = _checker(table, {A: "ok ", B: "ok ", C: "ok ", LIAR: "junk "})
    verdict = await spot.check(LIAR, "chat")
    assert verdict.outcome == "caught", verdict
    liar = table.get(LIAR)
    assert table.state(liar) is PeerState.BLOCKED and "spot-check wrong" in liar.caught
    assert all(x.peer_id != LIAR for x in table.candidates("chat")[0])
    assert any(x.peer_id == LIAR and "spot-check" in x.reason for x in table.candidates("chat")[1])
    verdict = await spot.check(A, "chat")
    assert verdict.outcome == "pass" and table.proven(table.get(A))


async def test_with_its_own_model_the_node_is_the_reference() -> None:
    table = _table()
    spot = _checker(table, {"local": "ok ", A: "ok ", LIAR: "junk "}, local_model="tiny.gguf")
    assert (await spot.check(A, "chat")).outcome == "pass"
    assert (await spot.check(LIAR, "chat")).outcome == "caught"
    assert "this node's own model" in table.get(LIAR).caught


async def test_two_strangers_disagreeing_judge_nobody() -> None:
    table = _table()
    for peer in (B, C):
        table.get(peer).record = None  # only A and the liar serve chat
    spot = _checker(table, {A: "ok ", LIAR: "junk "})
    verdict = await spot.check(LIAR, "chat")
    assert verdict.outcome == "inconclusive"
    assert table.state(table.get(LIAR)) is PeerState.LIVE and table.state(table.get(A)) is PeerState.LIVE


async def test_a_reported_peer_is_checked_at_once_even_with_periodic_checks_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = _table()
    spot = _checker(table, {A: "ok ", B: "ok ", C: "ok ", LIAR: "junk "})
    spot.every = 0.0
    async with trio.open_nursery() as nursery:
        await nursery.start(spot.run)
        await trio.sleep(600)
        assert spot.checks == 0  # nothing checked unasked
        table.record_report(LIAR, "nonsense")
        spot.check_now(LIAR)
        with trio.fail_after(5):
            while table.get(LIAR).caught == "":
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert table.get(LIAR).reports == 1


# --- real node processes and a liar -------------------------------------------------------------


def _answer_junk(fh: FederationHost, model: str, served: list[str]) -> None:
    """Every query answered at once, well formed, and wrong."""

    async def handle(stream: Any) -> None:
        try:
            async for msg in frames(stream):
                if isinstance(msg, wire.QueryRequest):
                    served.append(msg.query_id)
                    await stream.write(wire.encode(wire.Accepted(msg.query_id, 0)))
                    await stream.write(
                        wire.encode(
                            wire.Result(msg.query_id, {"text": "junk junk junk junk", "model": model}, {"tokens": 4})
                        )
                    )
        except Exception:
            pass

    fh.set_stream_handler(wire.PROTOCOL_ID, handle)


async def _claim(fh: FederationHost, me: Identity, model: str) -> None:
    seq = 0
    while True:
        seq += 1
        record = HealthRecord(
            peer_id=me.peer_id,
            seq=seq,
            timestamp=time.time(),
            version="test",
            success_ratio=1.0,
            realms=(RealmStatus("chat", model=model, queue_depth=0, slots=64, service_ms=5.0, gpu=True),),
        )
        await fh.pubsub.publish(HEALTH_TOPIC, sign_record(record, me))
        await trio.sleep(0.5)


async def _poll(node: NodeProcess, check: Any, timeout: float) -> Any:
    with trio.fail_after(timeout):
        while True:
            value = await trio.to_thread.run_sync(check)
            if value:
                return value
            await trio.sleep(0.3)  # pacing CLI polls


def _honest_pair(federation: Federation, **settings: str) -> tuple[NodeProcess, NodeProcess, NodeProcess, str]:
    r = federation.start("R", serve="none", settings=settings)
    c, d = federation.start_many(["C", "D"], serve="chat", bootstrap=(r.addr,))
    deadline = time.monotonic() + 30
    while not all("chat" in ((r.peer(x.peer_id) or {}).get("models") or {}) for x in (c, d)):
        assert time.monotonic() < deadline, "the honest executors never advertised chat"
        time.sleep(0.3)  # pacing CLI polls
    model = r.peer(c.peer_id)["models"]["chat"]
    assert model == r.peer(d.peer_id)["models"]["chat"]
    return r, c, d, model


async def test_a_peer_answering_junk_is_caught_by_spot_checks_and_users_get_honest_answers(
    federation: Federation,
) -> None:
    r, _c, _d, model = _honest_pair(federation)
    served: list[str] = []
    async with stranger() as (fh, me), trio.open_nursery() as nursery:
        _answer_junk(fh, model, served)
        await fh.dial(r.addr, timeout=15)
        await fh.pubsub.subscribe(HEALTH_TOPIC)
        nursery.start_soon(_claim, fh, me, model)
        started = time.monotonic()
        liar = await _poll(r, lambda: (p := r.peer(me.peer_id)) and p["state"] == "blocked" and p, 40)
        caught_after = time.monotonic() - started
        assert "spot-check wrong" in liar["caught"] and liar["blocked"] == liar["caught"]
        assert served  # it was sent canaries (no user had asked anything yet)
        plan = await trio.to_thread.run_sync(r.cli_json, "route", "chat")
        assert any(x["executor"] == me.peer_id and "spot-check" in x["reason"] for x in plan["excluded"])
        assert me.peer_id not in [x["executor"] for x in plan["candidates"]]
        before = len(served)
        for i in range(10):
            res = await trio.to_thread.run_sync(lambda: r.cli("query", "chat", f"hello {i}", "--max-tokens", "4"))
            assert "junk" not in res.stdout
        assert len(served) == before  # blocked: neither users' queries nor canaries reach it
        print(f"liar caught {caught_after:.1f}s after it connected")
        nursery.cancel_scope.cancel()


async def test_a_user_reports_a_wrong_answer_and_the_peer_is_checked_and_caught(federation: Federation) -> None:
    """Periodic checks off, and the router told to trust only the liar for chat: a user gets
    junk, reports it, and the report's spot-check catches the liar; the history says so."""
    async with stranger() as (fh, me), trio.open_nursery() as nursery:
        r, _c, _d, model = _honest_pair(
            federation, **{"router.spot_check_every": "0", "realms.chat.trusted": json.dumps([me.peer_id])}
        )
        served: list[str] = []
        _answer_junk(fh, model, served)
        await fh.dial(r.addr, timeout=15)
        await fh.pubsub.subscribe(HEALTH_TOPIC)
        nursery.start_soon(_claim, fh, me, model)
        await _poll(r, lambda: [x["executor"] for x in r.cli_json("route", "chat")["candidates"]] == [me.peer_id], 30)
        res = await trio.to_thread.run_sync(lambda: r.cli("query", "chat", "what is 2+2", "--max-tokens", "4"))
        assert "junk" in res.stdout and len(served) == 1  # the user's query; no canary unasked
        (row,) = await trio.to_thread.run_sync(lambda: r.cli_json("history"))
        assert row["executor"] == me.peer_id and "suspect" not in row
        out = await trio.to_thread.run_sync(lambda: r.cli("report", row["id"], "--reason", "not an answer"))
        assert short(me.peer_id) in out.stdout
        liar = await _poll(r, lambda: (p := r.peer(me.peer_id)) and p["caught"] and p, 30)
        assert liar["state"] == "blocked" and liar["reports"] == 1
        (row,) = await trio.to_thread.run_sync(lambda: r.cli_json("history"))
        assert "since caught" in row["suspect"]
        text = (await trio.to_thread.run_sync(lambda: r.cli("history"))).stdout
        assert "! answered by a peer since caught" in text
        # Reporting an answer this node gave itself is refused in one line.
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("qid", ["nope-not-a-query"])
def test_reporting_an_unknown_query_is_one_line_exit_2(federation: Federation, qid: str) -> None:
    node = federation.start("solo", serve="none")
    res = node.cli("report", qid, check=False)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
