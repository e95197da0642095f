"""10,000 malformed websocket messages against a running node: every one answered, no session lost.

Each message is a valid request with one thing broken (a field of the wrong JSON type, an op that
is an object, an integer past 64 bits, nesting thousands deep, NaN, junk text, a binary frame, an
unknown field or op), generated from a fixed seed. A message that broke the session would leave
its request unanswered and the next one unsent; the node's log must hold no ERROR line (each is a
bad request, not a failure of the node). The 100k-message variant is
``python -m rentahal.tests.test_ws_fuzz 100000``.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import trio

from rentahal.scripts.federation import Federation

VALID: list[dict[str, Any]] = [
    {"op": "hello", "guid": "0" * 32, "nickname": "fuzz"},
    {"op": "status"},
    {"op": "peers"},
    {"op": "realms"},
    {"op": "stats"},
    {"op": "route", "realm": "chat"},
    {"op": "submit_query", "realm": "chat", "payload": {"prompt": "hi", "max_tokens": 4}, "stream": False},
    {"op": "watch", "query_id": "a" * 32},
    {"op": "get_query", "query_id": "b" * 32},
    {"op": "cancel", "query_id": "c" * 32},
    {"op": "report", "query_id": "d" * 32, "reason": "wrong"},
    {"op": "history", "limit": 5},
    {"op": "set_nickname", "nickname": "n"},
    {"op": "ban", "guid": "1" * 32},
    {"op": "set_peer", "peer_id": "x", "blocked": True},
]


def junk_value(rng: random.Random) -> Any:
    kind = rng.randrange(12)
    if kind == 0:
        return 2 ** rng.randrange(64, 400) * rng.choice((1, -1))
    if kind == 1:
        return {"k": junk_value(rng)} if rng.random() < 0.5 else {}
    if kind == 2:
        return [junk_value(rng) for _ in range(rng.randrange(3))]
    if kind == 3:
        return rng.choice((True, False, None))
    if kind == 4:
        return rng.uniform(-1e308, 1e308)
    if kind == 5:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40)))
    if kind == 6:
        return {"$bytes": rng.choice(("!!", 5, "QUJD", ["x"]))}
    if kind == 7:
        return rng.randrange(-(2**63), 2**63)
    if kind == 8:
        return "x" * rng.randrange(2000)
    if kind == 9:
        return {"prompt": junk_value(rng), "max_tokens": junk_value(rng), "temperature": junk_value(rng)}
    return rng.choice(("", "chat", "teleport", "0" * 32, "zz" * 16))


def fuzzed(rng: random.Random) -> str | bytes:
    base = dict(rng.choice(VALID))
    kind = rng.randrange(10)
    if kind == 0:  # a field of any type
        base[rng.choice(sorted(base))] = junk_value(rng)
    elif kind == 1:  # an extra field, or a missing one
        if rng.random() < 0.5:
            base[rng.choice(("x", "payload", "limit", "all", "user", "enabled"))] = junk_value(rng)
        else:
            base.pop(rng.choice(sorted(base)))
    elif kind == 2:  # nesting deep enough to end a naive parser
        depth = rng.choice((50, 5000, 100000))
        return '{"op":"submit_query","realm":"chat","payload":{"prompt":' + "[" * depth + "]" * depth + "}}"
    elif kind == 3:
        return rng.choice(
            (
                '{"op": NaN}',
                '{"op": "status", "rid": Infinity}',
                "[1,2]",
                "null",
                '"status"',
                "{",
                "\x00\xff",
                "",
                '{"op":"status"} trailing',
                "1e999",
            )
        )
    elif kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    elif kind == 5:
        base["op"] = rng.choice(({"op": "status"}, ["status"], 7, None, "STATUS", "op_status", "__init__"))
    elif kind == 6:
        base["rid"] = junk_value(rng)
    elif kind == 7 and "payload" in base:
        base["payload"] = {rng.choice(("prompt", "max_tokens", "image", "audio", "seed", "stop")): junk_value(rng)}
    else:
        base[rng.choice(sorted(base))] = junk_value(rng)
    try:
        return json.dumps(base)
    except (ValueError, OverflowError):
        return json.dumps({"op": "status", "rid": "x"})


async def fuzz_session(url: str, n: int, seed: int) -> dict[str, int]:
    """Send ``n`` fuzzed messages on one connection, one at a time; each must be answered."""
    from trio_websocket import open_websocket_url

    rng = random.Random(seed)
    answered = 0
    codes: dict[str, int] = {}
    async with open_websocket_url(url, max_message_size=16 * 1024 * 1024) as ws:
        for _i in range(n):
            msg = fuzzed(rng)
            await ws.send_message(msg)
            with trio.fail_after(30):
                # A submit that passed validation answers with events before its result or error.
                while True:
                    reply = json.loads(await ws.get_message())
                    if reply.get("op") != "event":
                        break
            answered += 1
            key = reply.get("code", reply.get("op"))
            codes[key] = codes.get(key, 0) + 1
        await ws.send_message(json.dumps({"op": "status", "rid": "last"}))
        last = json.loads(await ws.get_message())
        assert last["op"] == "status", last
    return {"answered": answered, **codes}


def test_10k_malformed_messages_leave_every_session_alive(federation: Federation) -> None:
    node = federation.start("fuzzed", serve="none")
    mark = node.mark()
    counts = trio.run(fuzz_session, node.ui, 10_000, 1234)
    assert counts["answered"] == 10_000
    assert counts.get("bad_request", 0) > 5_000, counts  # most of them are refused as such
    assert counts.get("internal", 0) == 0, counts
    with node._cond:
        errors = [line for line in node.lines[mark:] if " ERROR " in line or "Traceback" in line]
    assert errors == [], errors[:5]


if __name__ == "__main__":  # the long variant: python -m rentahal.tests.test_ws_fuzz 100000
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(Path(tmp))
        try:
            n = fed.start("fuzzed", serve="none")
            print(trio.run(fuzz_session, n.ui, int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, 1234))
        finally:
            fed.close()
