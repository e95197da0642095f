"""Three real `rentahal-node run` processes on loopback: discovery, routing and failover.

A routes (it serves nothing); B and C serve chat with the smoke-test model and bootstrap from A.
"""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from rentahal.cli import _short as short
from rentahal.scripts.federation import Federation, NodeProcess

CHAT = {"realms.chat.max_tokens": "4000", "realms.chat.n_ctx": "4096"}
LONG = ("--ignore-eos", "--max-tokens", "4000")  # ~1 s of streaming: time to kill the executor


def three_nodes(federation: Federation, **a_settings: str) -> tuple[NodeProcess, NodeProcess, NodeProcess]:
    a = federation.start("A", serve="none", settings={"router.hang_timeout": "2", **a_settings})
    b, c = federation.start_many(["B", "C"], serve="chat", bootstrap=(a.addr,), settings=CHAT)
    for peer in (b, c):
        a.wait_for(rf"peer {peer.peer_id} is live \(serves: chat\)", 30)
    return a, b, c


def read_events(proc: subprocess.Popen[str], until: str | None = None) -> list[dict[str, Any]]:
    """JSON lines from a running `query --json`, up to the first event of type ``until``."""
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        msg = json.loads(line)
        out.append(msg)
        if until and msg.get("op") == "event" and msg["event"]["type"] == until:
            break
    return out


def test_router_node_discovers_peers_and_routes_chat(federation: Federation) -> None:
    a, b, c = three_nodes(federation)
    chat = next(r for r in a.cli_json("realms") if r["realm"] == "chat")
    assert chat["live_peers"] == 2
    assert sorted(chat["peers"]) == sorted([b.peer_id, c.peer_id])
    assert chat["local"]["status"] == "disabled"

    res = a.cli("query", "chat", "hello", "--max-tokens", "16", "--seed", "1")
    assert res.stdout.strip(), res.stderr
    assert any(f"answered by {short(p.peer_id)}" in res.stderr for p in (b, c)), res.stderr

    plan = a.cli_json("route", "chat")
    assert {x["executor"] for x in plan["candidates"]} == {b.peer_id, c.peer_id}
    assert plan["excluded"][0]["executor"] == "local"
    explained = a.cli("route", "chat", "--explain").stdout
    assert "excluded: not served here" in explained

    peers = {p["peer_id"]: p for p in a.cli_json("peers")}
    for node in (b, c):
        p = peers[node.peer_id]
        assert p["state"] == "live" and p["realms"] == ["chat"]
        # Records go out on change, on connect, and every p2p.health_heartbeat (10 s) besides.
        assert p["record_age_s"] is not None and p["record_age_s"] < 11
        assert p["models"]["chat"] == "rentahal-smoke-test"
    # B is the smoke-test chat executor and says so.
    b_chat = next(r for r in b.cli_json("realms") if r["realm"] == "chat")
    assert b_chat["local"] == {**b_chat["local"], "status": "ready", "smoke_test": True}
    assert "(smoke-test model)" in b.cli("realms").stdout


def _other(executor: str, b: NodeProcess, c: NodeProcess) -> tuple[NodeProcess, NodeProcess]:
    assert executor in (b.peer_id, c.peer_id), executor
    return (b, c) if executor == b.peer_id else (c, b)


def test_executor_killed_mid_stream_fails_over_once(federation: Federation) -> None:
    a, b, c = three_nodes(federation)
    q = a.query_process("chat", "tell me a long story", *LONG)
    head = read_events(q, until="token")
    executor = next(m["event"]["executor"] for m in head if m["event"]["type"] == "routed")
    victim, survivor = _other(executor, b, c)
    victim.kill()
    rest = read_events(q)
    assert q.wait(60) == 0, q.stderr.read() if q.stderr else ""

    results = [m for m in rest if m["op"] == "result"]
    assert len(results) == 1
    result = results[0]["result"]
    assert result["executor"] == survivor.peer_id
    assert result["failovers"] == [victim.peer_id]
    assert result["stats"]["tokens"] == 4000  # a complete answer from the survivor
    failovers = [m["event"] for m in rest if m["op"] == "event" and m["event"]["type"] == "failover"]
    assert [f["executor"] for f in failovers] == [victim.peer_id]
    assert failovers[0]["kind"] == "dead"
    # Tokens after the failover all come from the second attempt.
    after = rest[rest.index(next(m for m in rest if m.get("event", {}).get("type") == "failover")) :]
    assert {m["event"]["attempt"] for m in after if m.get("event", {}).get("type") == "token"} == {2}


def test_frozen_executor_is_detected_and_comes_back(federation: Federation) -> None:
    a, b, c = three_nodes(federation)
    q = a.query_process("chat", "tell me a long story", *LONG)
    head = read_events(q, until="token")
    executor = next(m["event"]["executor"] for m in head if m["event"]["type"] == "routed")
    victim, survivor = _other(executor, b, c)
    mark = a.mark()
    victim.signal(signal.SIGSTOP)
    try:
        rest = read_events(q)
        assert q.wait(60) == 0
        result = next(m["result"] for m in rest if m["op"] == "result")
        assert result["executor"] == survivor.peer_id
        assert result["failovers"] == [victim.peer_id]
        failover = next(m["event"] for m in rest if m.get("event", {}).get("type") == "failover")
        assert failover["kind"] == "hung"

        a.wait_for(rf"peer {victim.peer_id} is stale", 40, after=mark)  # p2p.stale_after: 25 s
        assert a.peer(victim.peer_id)["state"] == "stale"
        plan = a.cli_json("route", "chat")
        assert [x["executor"] for x in plan["candidates"]] == [survivor.peer_id]
        assert any(x["executor"] == victim.peer_id and x["reason"].startswith("stale") for x in plan["excluded"])
    finally:
        mark = a.mark()
        victim.signal(signal.SIGCONT)
    a.wait_for(rf"peer {victim.peer_id} is live", 15, after=mark)
    assert a.peer(victim.peer_id)["state"] == "live"


def test_frozen_executor_is_left_within_the_hang_timeout_and_out_of_routing(federation: Federation) -> None:
    """With the shipped hang_timeout (1.5 s: three missed keepalives) the query moves on within
    2.5 s of the executor freezing, and the frozen peer is out of routing at that moment."""
    import time

    a, b, c = three_nodes(federation, **{"router.hang_timeout": "1.5"})
    q = a.query_process("chat", "tell me a long story", *LONG)
    head = read_events(q, until="token")
    executor = next(m["event"]["executor"] for m in head if m["event"]["type"] == "routed")
    victim, survivor = _other(executor, b, c)
    victim.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        rest = read_events(q, until="failover")
        moved_on = time.monotonic() - frozen_at
        failover = rest[-1]["event"]
        assert failover["kind"] == "hung", failover
        assert moved_on < 2.5, moved_on
        assert a.peer(victim.peer_id)["state"] in ("unresponsive", "stale")
        plan = a.cli_json("route", "chat")
        assert [x["executor"] for x in plan["candidates"]] == [survivor.peer_id]
        rest = read_events(q)
        assert q.wait(60) == 0
        result = next(m["result"] for m in rest if m["op"] == "result")
        assert result["executor"] == survivor.peer_id
    finally:
        victim.signal(signal.SIGCONT)


def test_restart_keeps_peer_id_and_stops_cleanly(federation: Federation) -> None:
    node = federation.start("solo", serve="none")
    first = node.peer_id
    assert (node.data_dir / "node.run.json").exists()
    assert node.stop() == 0
    node.wait_for(r"stopped", 5)
    assert not (node.data_dir / "node.run.json").exists()
    assert (node.data_dir / "identity.key").stat().st_mode & 0o777 == 0o600
    assert (node.data_dir / "sysop.token").stat().st_mode & 0o777 == 0o600

    again = federation.start("solo", serve="none")
    assert again.peer_id == first
    assert again.cli("init").stdout.strip() == first


def test_client_commands_without_a_running_node_say_so(tmp_path) -> None:
    from rentahal.scripts.federation import BIN

    res = subprocess.run([BIN, "peers", "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: no running node for")
    assert "Traceback" not in res.stderr


def test_bad_config_stops_the_node_with_one_line(tmp_path) -> None:
    from rentahal.scripts.federation import BIN

    res = subprocess.run(
        [BIN, "run", "--data-dir", str(tmp_path), "--set", "router.hang_timeout=-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "router.hang_timeout" in res.stderr and "command line" in res.stderr

    (tmp_path / "node.toml").write_text("[p2p]\nlisten_adress = []\n")
    res = subprocess.run([BIN, "run", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "p2p.listen_adress" in res.stderr and "did you mean 'p2p.listen'" in res.stderr
    res = subprocess.run(
        [BIN, "run", "--data-dir", str(tmp_path), "--serve", "chat,teleport"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "teleport" in res.stderr


@pytest.mark.parametrize("realm", ["chat"])
def test_query_with_no_executor_is_a_clear_error(federation: Federation, realm: str) -> None:
    a = federation.start("lonely", serve="none")
    res = a.cli("query", realm, "hello", check=False)
    assert res.returncode == 1
    assert res.stderr.startswith("error: realm_not_served: no executor for realm 'chat'")
    assert "not served here" in res.stderr


def test_second_node_on_a_taken_port_stops_with_one_line(federation: Federation, tmp_path) -> None:
    """libp2p listens with SO_REUSEPORT: without the check, both nodes would run and the kernel
    would split incoming connections between them."""
    import socket

    from rentahal.scripts.federation import BIN

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = federation.start("A", serve="none", listen=f"/ip4/127.0.0.1/tcp/{port}")
    assert f"/tcp/{port}/" in a.addr
    res = subprocess.run(
        [
            BIN,
            "run",
            "--data-dir",
            str(tmp_path / "second"),
            "--listen",
            f"/ip4/127.0.0.1/tcp/{port}",
            "--ui-port",
            "0",
            "--serve",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "already in use" in lines[0], res.stderr
