"""The UI port: static files over HTTP and the websocket upgrade on one listener, against real
sockets; malformed or slow requests get an answer or a closed connection, never a stuck server."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import WebSocketRequest, open_websocket_url

from rentahal.node.http import BODY_TIMEOUT, BadHead, Exchange, answer_http, load_ui_files, parse_head, serve_ui

FILES = {
    "/": ("text/html; charset=utf-8", b"<!doctype html><title>t</title>"),
    "/index.html": ("text/html; charset=utf-8", b"<!doctype html><title>t</title>"),
    "/app.js": ("text/javascript; charset=utf-8", b"console.log(1)"),
}


async def echo(request: WebSocketRequest, client: str, headers: dict[str, str]) -> None:
    ws = await request.accept()
    msg = await ws.get_message()
    await ws.send_message(f"{client} said {msg} on {request.path}")


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    return await nursery.start(
        lambda task_status: serve_ui(
            echo, "127.0.0.1", 0, max_message_size=1 << 20, head_timeout=1.0, files=FILES, task_status=task_status
        )
    )


async def raw(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


def split(resp: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return lines[0], {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}, body


async def test_files_and_the_websocket_share_the_port(port: int) -> None:
    status, headers, body = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == "HTTP/1.1 200 OK" and body == FILES["/"][1]
    assert headers["content-type"].startswith("text/html") and headers["content-length"] == str(len(body))
    assert "default-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    status, headers, body = split(await raw(port, b"GET /app.js?v=2 HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert (
        status.endswith("200 OK")
        and headers["content-type"].startswith("text/javascript")
        and body == b"console.log(1)"
    )
    status, headers, body = split(await raw(port, b"HEAD /app.js HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status.endswith("200 OK") and body == b"" and headers["content-length"] == "14"
    async with open_websocket_url(f"ws://127.0.0.1:{port}/some/path") as ws:
        await ws.send_message("hi")
        assert await ws.get_message() == "127.0.0.1 said hi on /some/path"


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (b"GET /node.toml HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", "405"),
        (b"GARBAGE\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "431"),
        (b"GET / HTTP/1.1\r\n\r\n", "400"),  # HTTP/1.1 without Host (RFC 9112)
    ],
)
async def test_bad_requests_get_a_clear_status(port: int, request_bytes: bytes, status: str) -> None:
    line, _, body = split(await raw(port, request_bytes))
    assert line.split(" ")[1] == status, (line, body)


async def test_a_silent_or_half_sent_client_is_dropped_and_others_are_served(port: int) -> None:
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    half = await trio.open_tcp_stream("127.0.0.1", port)
    await half.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never ends its head
    status, _, _ = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))  # served meanwhile
    assert status.endswith("200 OK")
    with trio.fail_after(10):  # head_timeout is 1 s here: both are hung up on
        for stream in (silent, half):
            assert await stream.receive_some(100) == b""
    await silent.aclose()
    await half.aclose()


def test_parse_head_and_answers() -> None:
    head = parse_head(b"GET /x HTTP/1.0\r\nUpgrade: WebSocket\r\nHost: a:1\r\n\r\nrest")
    assert (head.method, head.target, head.headers["upgrade"], head.headers["host"]) == (
        "GET",
        "/x",
        "WebSocket",
        "a:1",
    )
    assert head.raw.endswith(b"rest")
    for bad in (
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET /\r\n\r\n",
        b"GET / SPDY/3\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
    ):
        with pytest.raises(BadHead):
            parse_head(bad)
    assert answer_http(parse_head(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n"), FILES).startswith(b"HTTP/1.1 405")


def test_the_bundled_ui_is_installed() -> None:
    files: dict[str, Any] = load_ui_files()
    assert {"/", "/index.html", "/app.js", "/style.css"} <= set(files)
    assert files["/"] == files["/index.html"] and b"app.js" in files["/"][1]


def test_which_pages_may_open_the_websocket() -> None:
    from rentahal.node.control import origin_allowed

    assert origin_allowed(None)  # not a browser
    assert origin_allowed("http://127.0.0.1:8765", "127.0.0.1:8765")
    assert origin_allowed("http://localhost:8765", "localhost:8765")
    assert origin_allowed("http://[::1]:8765", "[::1]:8765")
    # Another page on this machine is another site, unless the operator allowed it.
    for origin in ("http://localhost:3000", "http://127.0.0.1:3000", "http://[::1]:8765"):
        assert not origin_allowed(origin, "127.0.0.1:8765"), origin
    assert origin_allowed("http://localhost:3000", "127.0.0.1:8765", ("http://localhost:3000",))
    # The page this node served, opened over the LAN by its IP address: same origin.
    assert origin_allowed("http://192.0.2.2:8765", "192.0.2.2:8765")
    assert origin_allowed("http://[2001:db8::2]:8765", "[2001:db8::2]:8765")
    for origin, host in (
        ("http://evil.example", "192.0.2.2:8765"),  # another site
        ("https://192.0.2.2:8765", "192.0.2.2:8765"),  # another scheme: not a page of ours
        ("http://evil.example:8765", "evil.example:8765"),  # DNS rebinding: same origin, but a name
        ("http://192.0.2.2:8765", None),
        ("null", "192.0.2.2:8765"),
        ("http://[::1", "127.0.0.1:8765"),
    ):
        assert not origin_allowed(origin, host), (origin, host)


async def hold(request: WebSocketRequest, client: str, headers: dict[str, str]) -> None:
    ws = await request.accept()
    await ws.get_message()  # held open until the client closes it


async def test_connections_are_capped_per_client_with_an_answer_and_a_reserve(nursery: trio.Nursery) -> None:
    port = await nursery.start(
        lambda task_status: serve_ui(
            hold,
            "127.0.0.1",
            0,
            max_message_size=1 << 20,
            head_timeout=60,
            files=FILES,
            max_per_client=2,
            max_pending_per_client=2,
            reserved=1,
            may_use_reserved=lambda h: h.get("x-sysop") == "yes",
            task_status=task_status,
        )
    )
    url = f"ws://127.0.0.1:{port}/"
    async with open_websocket_url(url), open_websocket_url(url):  # every ordinary place taken
        status, headers, _ = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status.endswith("503 Service Unavailable") and headers["retry-after"] == "5"
        # ... but not the reserved one, which the operator's request may take.
        async with open_websocket_url(url, extra_headers=[(b"X-Sysop", b"yes")]):
            status, _, _ = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Sysop: yes\r\n\r\n"))
            assert status.endswith("503 Service Unavailable")  # the reserve is one place
        status, _, body = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Sysop: yes\r\n\r\n"))
        assert status.endswith("200 OK") and body == FILES["/"][1]
    # Connections that never send a request are capped too, and answered at once.
    idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await trio.testing.wait_all_tasks_blocked()  # the server (this process) has taken both in
    extra = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):  # at once, not after the 60 s head timeout
        got = b""
        while chunk := await extra.receive_some(1000):
            got += chunk
    assert got.startswith(b"HTTP/1.1 503 ")
    # One that sends its request meanwhile gets the 503 too, not a reset (its request unread).
    for _ in range(5):
        assert split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))[0].endswith("503 Service Unavailable")
    await idle[0].aclose()
    with trio.fail_after(10):  # a place is free again: the next request is served
        while True:
            resp = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if resp and not resp.startswith(b"HTTP/1.1 503"):  # idle[0]'s close may still be on its way
                break
    assert split(resp)[0].endswith("200 OK")
    await idle[1].aclose()


async def test_bytes_the_server_did_not_read_do_not_cut_its_answer_off(port: int) -> None:
    status, _, body = split(await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100_000))
    assert status.endswith("200 OK") and body == FILES["/"][1]
    status, _, _ = split(
        await raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"y" * 100_000)
    )
    assert status.endswith("405 Method Not Allowed")


# --- API request bodies (Exchange) ----------------------------------------------------------------


async def _exchange(head: bytes, body_parts: list[bytes]) -> tuple[Exchange, trio.abc.Stream]:
    server, client = trio.testing.memory_stream_pair()
    await client.send_all(head)
    parsed = None
    raw = b""
    while parsed is None:  # the head (and any body bytes after it) fed to h11, as serve_ui does
        raw += await server.receive_some(65536)
        try:
            parsed = parse_head(raw)
        except BadHead:
            continue
    for part in body_parts:
        await client.send_all(part)
    return Exchange(server, parsed, "127.0.0.1"), client


async def test_an_api_body_is_read_whole_and_capped() -> None:
    ex, _ = await _exchange(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello", [b" world"])
    assert await ex.body(100) == b"hello world"
    ex, _ = await _exchange(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 500\r\n\r\n", [])
    with pytest.raises(BadHead) as too_big:
        await ex.body(100)
    assert too_big.value.status == 413
    chunked = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    ex, _ = await _exchange(chunked, [b"40\r\n" + b"x" * 64 + b"\r\n", b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n"])
    with pytest.raises(BadHead) as undeclared:  # no length announced: counted as it comes
        await ex.body(100)
    assert undeclared.value.status == 413


async def test_a_trickled_body_times_out_with_408(autojump_clock: trio.testing.MockClock) -> None:
    ex, _client = await _exchange(b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc", [])
    started = trio.current_time()
    with pytest.raises(BadHead) as slow:
        await ex.body(100)
    assert slow.value.status == 408 and trio.current_time() - started == pytest.approx(BODY_TIMEOUT)
