"""The operator's CLI: --version, --json on every command, peers by name, why a query failed,
the audit log, JSON log lines."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import typer.main

from rentahal.cli import _short as short
from rentahal.cli import app
from rentahal.scripts.federation import BIN, Federation


def commands(group: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a sub-app (typer's group class)
            out.update(commands(cmd, f"{prefix}{name} "))
        else:
            out[prefix + name] = cmd
    return out


def test_every_command_takes_json_and_there_is_a_version() -> None:
    every = commands(typer.main.get_command(app))
    assert {"audit", "keys create", "keys list", "keys revoke", "status", "peers"} <= set(every)
    lacking = [name for name, cmd in every.items() if name != "run" and not any("--json" in p.opts for p in cmd.params)]
    assert lacking == []
    out = subprocess.run([BIN, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("rentahal-node ")


def test_peers_by_name_failure_reasons_audit_and_json_logs(federation: Federation) -> None:
    b = federation.start("B", serve="chat", settings={"node.name": '"bob"', "realms.chat.threads": "1"})
    a = federation.start("A", serve="none", bootstrap=(b.addr,), settings={"node.log_format": '"json"'})
    a.wait_for(rf"peer {b.peer_id} is live", 60)
    who = f"bob ({short(b.peer_id)})"

    row = next(x for x in a.cli("peers").stdout.splitlines() if x.startswith(short(b.peer_id)))
    assert " bob " in row and " live " in row, row
    assert f"1. {who}  score" in a.cli("route", "chat").stdout
    res = a.cli("query", "chat", "hello", "--max-tokens", "4")
    assert f"executor: {who} (attempt 1)" in res.stderr and f"answered by {who}" in res.stderr, res.stderr

    # A query nobody can answer: history says why.
    failed = a.cli("query", "imagine", "a cat", check=False)
    assert failed.returncode == 1
    # A query that is itself wrong: exit 2, one line naming the field.
    wrong = a.cli("query", "chat", "hello", "--max-tokens", "-3", check=False)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "error: bad_request: payload.max_tokens: expected an integer in 1..1073741824, got -3"
    ], wrong.stderr
    history = a.cli("history").stdout
    assert "failed" in history and "realm_not_served: no executor for realm 'imagine'" in history, history

    # A routing-only node's stats show what it routed (they were all zeros: it executes nothing).
    stats = a.cli_json("stats")
    assert (stats["chat"]["asked_done"], stats["chat"]["answered_by_peers"], stats["chat"]["served_local"]) == (1, 1, 0)
    assert stats["imagine"]["asked_failed"] == 1

    user = a.cli_json("history")[0]["user_guid"]  # the CLI's own user
    a.cli("ban", user, "--reason", "testing the audit")
    audit = a.cli_json("audit")
    assert (audit[0]["action"], audit[0]["target"], audit[0]["detail"]) == ("ban", user, "testing the audit")
    assert "testing the audit" in a.cli("audit").stdout

    # --log-format json: every line the node wrote is one JSON object
    records = [json.loads(line) for line in a.lines if line.startswith("{")]
    assert records and len(records) == len([x for x in a.lines if x and x != "<exited>"])
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("ready peer=") for r in records)
