"""The query conversation without sockets: the sans-IO state machines of p2p/conversation.py,
then the stream adapter of p2p/query.py over trio's in-memory streams, on a MockClock."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing

from rentahal.p2p import conversation as conv
from rentahal.p2p import wire
from rentahal.p2p.query import IncomingQuery, QueryClient, QueryService
from rentahal.realms import events as ev
from rentahal.realms.events import Code, ExecutorFailure, FailureKind

REQ = dict(realm="chat", payload={"prompt": "hi"}, deadline_s=30.0)


def requester() -> conv.Requester:
    return conv.Requester("QmSender", first_progress=5.0, hang_timeout=1.5)


def failure(actions: list[conv.Action]) -> ExecutorFailure:
    fails = [a for a in actions if isinstance(a, conv.Fail)]
    assert len(fails) == 1, actions
    return fails[0].failure


# --- the requester's rules ---------------------------------------------------------------------


def test_an_answer_streams_then_completes() -> None:
    r = requester()
    (send,) = r.start("q1", now=0.0, **REQ)
    assert isinstance(send, conv.Send) and isinstance(send.message, wire.QueryRequest)
    assert send.message.deadline_ms == 30_000 and send.message.origin == "QmSender"
    assert r.receive(wire.Accepted("q1", 0, None), 0.01) == [conv.Deliver("q1", ev.Accepted(0, None))]
    assert r.receive(wire.Token("q1", "he", 0), 0.02) == [conv.Deliver("q1", ev.Token("he", 0))]
    assert r.receive(wire.Progress("q1", conv.KEEPALIVE_STAGE, 0, None), 0.5) == []  # liveness only
    assert r.receive(wire.Result("q1", {"text": "hello"}, {"tokens": 2}), 0.6) == [
        conv.Complete("q1", ev.Result({"text": "hello"}, {"tokens": 2}))
    ]
    assert r.active == {} and r.next_deadline() is None
    assert r.receive(wire.Token("q1", "late", 3), 0.7) == []  # late news about a finished query


def test_silence_is_a_hang_after_hang_timeout() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    r.receive(wire.Accepted("q1", 0, None), 0.1)
    assert r.next_deadline() == pytest.approx(1.6)
    assert r.tick(1.59) == []
    actions = r.tick(1.6)
    f = failure(actions)
    assert f.kind is FailureKind.HUNG and "no frame for 1.5s" in f.message
    assert conv.Send(wire.Cancel("q1")) in actions  # the executor is told to stop
    assert r.active == {}


def test_keepalives_alone_do_not_extend_the_first_progress_budget() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    for i in range(1, 10):
        t = i * 0.5
        assert r.receive(wire.Progress("q1", conv.KEEPALIVE_STAGE, 0, None), t) == []
        assert r.tick(t) == []
    f = failure(r.tick(5.0))
    assert f.kind is FailureKind.STALLED and "keepalives only" in f.message


def test_keepalives_keep_a_working_executor_alive_past_the_first_budget() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    r.receive(wire.Accepted("q1", 3, 20_000), 0.05)  # queued third: a long, honest wait
    for i in range(1, 40):
        t = i * 0.5
        r.receive(wire.Progress("q1", conv.KEEPALIVE_STAGE, 0, None), t)
        assert r.tick(t) == []
    assert "q1" in r.active


def test_a_frame_for_an_unknown_query_breaks_the_stream_for_all() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    r.start("q2", now=0.0, **REQ)
    actions = r.receive(wire.Token("other", "x", 0), 0.1)
    fails = [a for a in actions if isinstance(a, conv.Fail)]
    assert {f.query_id for f in fails} == {"q1", "q2"}
    assert all(f.failure.kind is FailureKind.PROTOCOL for f in fails)
    assert isinstance(actions[-1], conv.Reset) and r.broken
    # Nothing more goes out on a broken stream; a new attempt fails at once.
    assert failure(r.start("q3", now=0.2, **REQ)).kind is FailureKind.DEAD


def test_an_executor_sending_requests_is_a_violation() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    request = wire.QueryRequest(wire.PROTOCOL_VERSION, "q1", "chat", {}, 1, "QmX")
    assert isinstance(r.receive(request, 0.1)[-1], conv.Reset)


def test_an_error_carries_its_code_and_retry_after() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    f = failure(r.receive(wire.Error("q1", Code.BUSY, "full", 250), 0.1))
    assert (f.code, f.kind, f.retry_after) == (Code.BUSY, FailureKind.REFUSED, 0.25)
    assert f.code.back_pressure and f.retryable


@pytest.mark.parametrize("stats", [{"ms": math.nan}, {"cost": math.inf}, {"x": -math.inf}])
def test_a_non_finite_number_in_an_answer_is_a_protocol_error(stats: dict[str, Any]) -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    f = failure(r.receive(wire.Result("q1", {"text": "x"}, stats), 0.1))
    assert f.kind is FailureKind.PROTOCOL and "non-finite" in f.message


def test_cancel_tells_the_executor_once_and_lost_fails_the_rest() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    r.start("q2", now=0.0, **REQ)
    assert r.cancel("q1") == [conv.Send(wire.Cancel("q1"))]
    assert r.cancel("q1") == []
    f = failure(r.lost("ConnectionResetError"))
    assert f.kind is FailureKind.DEAD and "ConnectionResetError" in f.message


def test_an_outside_verdict_abandons_an_attempt() -> None:
    r = requester()
    r.start("q1", now=0.0, **REQ)
    actions = r.abandon("q1", FailureKind.HUNG, "peer went stale")
    assert failure(actions).kind is FailureKind.HUNG
    assert conv.Send(wire.Cancel("q1")) in actions


def test_a_request_that_cannot_be_sent_is_a_local_protocol_error() -> None:
    r = requester()
    with pytest.raises(ev.LocalProtocolError):
        r.start("q1", now=0.0, realm="chat", payload={"x": 2**70}, deadline_s=1.0)
    assert r.active == {}


# --- the executor's rules ----------------------------------------------------------------------


def request(qid: str) -> wire.QueryRequest:
    return wire.QueryRequest(wire.PROTOCOL_VERSION, qid, "chat", {"prompt": "hi"}, 10_000, "QmPeer")


def test_responder_starts_stops_and_bounds_queries() -> None:
    r = conv.Responder(max_active=2)
    assert r.receive(request("a"), 0.0) == [conv.Start(request("a"))]
    (dup,) = r.receive(request("a"), 0.0)
    assert isinstance(dup, conv.Send) and dup.message.code is Code.BAD_REQUEST
    r.receive(request("b"), 0.0)
    (busy,) = r.receive(request("c"), 0.0)
    assert busy.message.code is Code.BUSY and busy.message.retry_after_ms == 500
    assert r.receive(wire.Cancel("a"), 0.1) == [conv.Stop("a")]
    assert r.receive(wire.Cancel("zzz"), 0.1) == []  # finished already: nothing to stop
    assert isinstance(r.receive(wire.Token("a", "x", 0), 0.1)[0], conv.Reset)


def test_responder_keepalives_only_for_quiet_queries() -> None:
    r = conv.Responder(max_active=4)
    r.receive(request("a"), 0.0)
    r.receive(request("b"), 0.0)
    r.sent("b", 0.4)
    assert r.next_deadline() == pytest.approx(0.5)
    assert r.tick(0.5) == [conv.Send(wire.Progress("a", conv.KEEPALIVE_STAGE, 0, None))]
    assert r.tick(0.9) == [conv.Send(wire.Progress("b", conv.KEEPALIVE_STAGE, 0, None))]
    r.finished("a")
    r.finished("b")
    assert r.next_deadline() is None


# --- the adapter over in-memory streams --------------------------------------------------------


class _PeerID:
    def __init__(self, name: str) -> None:
        self.name = name

    def to_base58(self) -> str:
        return self.name


class MemoryStream:
    """The few methods of a libp2p stream the adapter uses, over a trio in-memory stream."""

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self.stream = stream
        self.muxed_conn = type("Conn", (), {"peer_id": _PeerID(peer)})()
        self.writes = 0

    async def read(self, n: int) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def write(self, data: bytes) -> None:
        self.writes += 1
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        await self.stream.aclose()


class MemoryHost:
    """``new_stream`` hands the client one end of a fresh in-memory pair; the other end is
    served by ``service`` as libp2p would."""

    def __init__(self, nursery: trio.Nursery, service: QueryService) -> None:
        self.nursery = nursery
        self.service = service
        self.opened = 0

    async def new_stream(self, peer_id: Any, protocols: list[str]) -> MemoryStream:
        self.opened += 1
        a, b = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.service.handle_stream, MemoryStream(b, "QmRequester"))
        return MemoryStream(a, str(peer_id))


class Collect:
    def __init__(self) -> None:
        self.events: list[ev.StreamEvent] = []

    async def __call__(self, event: ev.StreamEvent) -> None:
        self.events.append(event)


def _peer_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    import libp2p.peer.id as libp2p_id

    monkeypatch.setattr(libp2p_id.ID, "from_base58", staticmethod(lambda s: s))


async def echo(incoming: IncomingQuery, emit: Any) -> ev.Result:
    await emit(ev.Accepted(0, None))
    text = incoming.request.payload["prompt"]
    for i, ch in enumerate(text):
        await emit(ev.Token(ch, i))
    return ev.Result({"text": text}, {"tokens": len(text)})


async def run_client(handler: Any, body: Any, **client_kw: Any) -> Any:
    async with trio.open_nursery() as nursery:
        host = MemoryHost(nursery, QueryService(handler))
        client = QueryClient(
            host, "QmRequester", dial_timeout=5.0, **{"first_progress": 5.0, "hang_timeout": 1.5, **client_kw}
        )
        await nursery.start(client.run)
        out = await body(client, host)
        nursery.cancel_scope.cancel()
    return out


async def test_queries_share_one_stream(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _peer_ids(monkeypatch)

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        results: dict[str, ev.Result] = {}

        async def one(qid: str, prompt: str) -> None:
            got = Collect()
            results[qid] = await client.execute(
                "QmExec", query_id=qid, realm="chat", payload={"prompt": prompt}, deadline_s=10, emit=got
            )
            assert "".join(e.text for e in got.events if isinstance(e, ev.Token)) == prompt

        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(one, f"q{i}", f"hello {i}")
        return results, host.opened

    results, opened = await run_client(echo, body)
    assert opened == 1
    assert {q: r.output["text"] for q, r in results.items()} == {f"q{i}": f"hello {i}" for i in range(20)}


async def test_a_frozen_executor_is_left_after_hang_timeout(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _peer_ids(monkeypatch)
    frozen = trio.Event()

    async def freezes(incoming: IncomingQuery, emit: Any) -> ev.Result:
        await emit(ev.Token("a", 0))
        await frozen.wait()
        raise AssertionError("unreachable")

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        # The service's keepalives would show it alive: freeze the whole stream as SIGSTOP does.
        original = MemoryStream.write

        async def stuck(self: MemoryStream, data: bytes) -> None:
            if self.muxed_conn.peer_id.name == "QmRequester" and self.writes >= 1:
                await trio.sleep_forever()
            await original(self, data)

        monkeypatch.setattr(MemoryStream, "write", stuck)
        started = trio.current_time()
        with pytest.raises(ExecutorFailure) as info:
            await client.execute(
                "QmExec", query_id="q1", realm="chat", payload={"prompt": "x"}, deadline_s=60, emit=Collect()
            )
        return info.value, trio.current_time() - started

    failed, took = await run_client(freezes, body)
    assert failed.kind is FailureKind.HUNG
    assert 1.5 <= took < 1.8


async def test_a_keepalive_only_executor_is_abandoned_within_its_first_progress_budget(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _peer_ids(monkeypatch)
    stopped = trio.Event()

    async def stalls(incoming: IncomingQuery, emit: Any) -> ev.Result:
        try:
            await trio.sleep_forever()  # the service sends its keepalives meanwhile
        finally:
            stopped.set()
        raise AssertionError("unreachable")

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        started = trio.current_time()
        with pytest.raises(ExecutorFailure) as info:
            await client.execute(
                "QmExec", query_id="q1", realm="chat", payload={"prompt": "x"}, deadline_s=60, emit=Collect()
            )
        with trio.fail_after(1):
            await stopped.wait()  # the cancel reached the executor: its work stopped
        return info.value, trio.current_time() - started

    failed, took = await run_client(stalls, body, first_progress=2.0)
    assert failed.kind is FailureKind.STALLED
    assert 2.0 <= took < 2.2


async def test_cancelling_many_attempts_never_breaks_the_stream(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel storm: attempts cancelled at random points while others run on the same
    stream; every honest query still completes and the stream is never reset."""
    _peer_ids(monkeypatch)

    async def slow(incoming: IncomingQuery, emit: Any) -> ev.Result:
        await emit(ev.Accepted(0, None))
        for i in range(5):
            await trio.sleep(0.01)
            await emit(ev.Token("t", i))
        return ev.Result({"text": "ttttt"}, {})

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        honest = 0
        for rnd in range(30):
            async with trio.open_nursery() as n:
                for k in range(6):

                    async def doomed(k: int = k) -> None:
                        with trio.move_on_after(0.005 * (k + 1)):
                            await client.execute(
                                "QmExec",
                                query_id=f"c{rnd}-{k}",
                                realm="chat",
                                payload={"prompt": "x"},
                                deadline_s=10,
                                emit=Collect(),
                            )

                    n.start_soon(doomed)
                result = await client.execute(
                    "QmExec", query_id=f"h{rnd}", realm="chat", payload={"prompt": "x"}, deadline_s=10, emit=Collect()
                )
                honest += result.output == {"text": "ttttt"}
        return honest, host.opened

    honest, opened = await run_client(slow, body)
    assert (honest, opened) == (30, 1)


async def test_an_error_reaches_the_requester_with_its_code(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _peer_ids(monkeypatch)

    async def refuses(incoming: IncomingQuery, emit: Any) -> ev.Result:
        raise ExecutorFailure("chat queue full", Code.QUEUE_FULL, retry_after=0.3)

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        with pytest.raises(ExecutorFailure) as info:
            await client.execute(
                "QmExec", query_id="q1", realm="chat", payload={"prompt": "x"}, deadline_s=5, emit=Collect()
            )
        return info.value

    f = await run_client(refuses, body)
    assert (f.code, f.kind, f.retry_after, f.message) == (Code.QUEUE_FULL, FailureKind.REFUSED, 0.3, "chat queue full")


async def test_an_executor_past_the_request_deadline_answers_deadline_exceeded(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _peer_ids(monkeypatch)

    async def slow(incoming: IncomingQuery, emit: Any) -> ev.Result:
        await emit(ev.Accepted(0, None))
        while True:  # working, with progress, but not done in time
            await trio.sleep(0.2)
            await emit(ev.Progress("denoising", 1, None))

    async def body(client: QueryClient, host: MemoryHost) -> Any:
        started = trio.current_time()
        with pytest.raises(ExecutorFailure) as info:
            await client.execute(
                "QmExec", query_id="q1", realm="chat", payload={"prompt": "x"}, deadline_s=3.0, emit=Collect()
            )
        return info.value, trio.current_time() - started

    f, took = await run_client(slow, body)
    assert (f.code, f.kind) == (Code.DEADLINE_EXCEEDED, FailureKind.REFUSED)
    assert "3000 ms" in f.message and 3.0 <= took < 3.1


async def test_a_watched_idle_stream_sleeps_instead_of_spinning(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream held open to a live executor (watch) with no query on it for longer than
    IDLE_CLOSE once woke its timer at a deadline already past, forever: half a core per watched
    peer, on every idle executor of a federation (found by py-spy during the hour-long soak)."""
    from rentahal.p2p import query as query_module

    _peer_ids(monkeypatch)
    wakes = [0]
    real = trio.move_on_at

    def counting(deadline: float, *args: Any, **kw: Any) -> Any:
        wakes[0] += 1
        if wakes[0] > 1000:  # with the bug the clock never moves on: fail instead of hanging
            raise AssertionError("the idle stream's timer spins")
        return real(deadline, *args, **kw)

    monkeypatch.setattr(query_module.trio, "move_on_at", counting)

    async def body(client: QueryClient, host: MemoryHost) -> int:
        async with trio.open_nursery() as n:
            n.start_soon(client.watch, "QmExec")
            await trio.sleep(20 * query_module.IDLE_CLOSE)  # twenty minutes without a query
            assert host.opened == 1  # still held open
            n.cancel_scope.cancel()
        return wakes[0]

    assert await run_client(echo, body) < 50
