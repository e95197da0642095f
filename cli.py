"""``rentahal-node``: run a federation node, and ask a running one what it knows.

Every command but ``init`` and ``run`` talks to the node already running on the data dir,
through its local websocket (the address is in ``<data dir>/node.run.json``); none starts a
libp2p host of its own.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A peer-to-peer federation node serving AI realms (chat, vision, imagine, speech).",
)

DataDir = typer.Option(
    None, "--data-dir", envvar="RENTAHAL_HOME", help="Node data dir [default: ~/.rentahal]",
    show_default=False,
)
SYSOP_TOKEN_FILE = "sysop.token"
CONFIG_FILE = "node.toml"


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def resolve_data_dir(data_dir: Optional[Path]) -> Path:
    return (data_dir or Path.home() / ".rentahal").expanduser().resolve()


def ensure_initialised(data_dir: Path) -> tuple[str, bool]:
    """Create the data dir, identity, node.toml and sysop token where missing."""
    from .node.config import default_config_text
    from .p2p.identity import IdentityError, load_or_create_identity, write_private_file

    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity, created = load_or_create_identity(data_dir)
        config = data_dir / CONFIG_FILE
        if not config.exists():
            config.write_text(default_config_text())
        token = data_dir / SYSOP_TOKEN_FILE
        if not token.exists():
            write_private_file(token, (secrets.token_urlsafe(32) + "\n").encode())
    except IdentityError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot initialise {data_dir}: {exc.strerror or exc}")
    return identity.peer_id, created


@app.command()
def init(data_dir: Optional[Path] = DataDir) -> None:
    """Create the data dir, the node's Ed25519 identity, node.toml and a sysop token."""
    path = resolve_data_dir(data_dir)
    peer_id, created = ensure_initialised(path)
    typer.echo(f"{'created' if created else 'existing'} node {peer_id} in {path}", err=True)
    typer.echo(peer_id)


@app.command()
def run(
    data_dir: Optional[Path] = DataDir,
    listen: list[str] = typer.Option([], "--listen", help="Multiaddr to listen on (repeatable)"),
    bootstrap: list[str] = typer.Option([], "--bootstrap", help="Bootstrap multiaddr with /p2p/ (repeatable)"),
    ui_port: Optional[int] = typer.Option(None, "--ui-port", help="Local websocket port (0 = any free)"),
    serve: Optional[str] = typer.Option(None, "--serve", help="Realms to serve: REALM,... or none"),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug|info|warning|error"),
    set_: list[str] = typer.Option([], "--set", help="Override any node.toml key: KEY=VALUE (repeatable)"),
) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    import trio

    from .node.config import REALMS, ConfigError, load_config, parse_set_option

    path = resolve_data_dir(data_dir)
    ensure_initialised(path)
    overrides: dict[str, str] = {}
    try:
        for item in set_:
            key, value = parse_set_option(item)
            overrides[key] = value
        if listen:
            overrides["p2p.listen"] = json.dumps(listen)
        if bootstrap:
            overrides["p2p.bootstrap"] = json.dumps(bootstrap)
        if ui_port is not None:
            overrides["ui.port"] = str(ui_port)
        if log_level is not None:
            overrides["node.log_level"] = json.dumps(log_level)
        if serve is not None:
            wanted = {r.strip() for r in serve.split(",") if r.strip()} - {"none"}
            unknown = wanted - set(REALMS)
            if unknown:
                fail(f"--serve: unknown realm(s) {sorted(unknown)}; expected some of {list(REALMS)} or none")
            for realm in REALMS:
                overrides[f"realms.{realm}.serve"] = "true" if realm in wanted else "false"
        config = load_config(path / CONFIG_FILE, overrides)
    except ConfigError as exc:
        fail(str(exc))
    setup_logging(config.node.log_level)
    try:
        trio.run(_run_node, config, path)
    except KeyboardInterrupt:
        pass


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _run_node(config: Any, data_dir: Path) -> None:
    import trio

    from .node.daemon import Node
    from .p2p.host import DialError
    from .p2p.identity import load_or_create_identity

    log = logging.getLogger("rentahal.node")
    identity, _ = load_or_create_identity(data_dir)
    node = Node(config, data_dir, identity)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for sig in signals:
                    log.info("received %s, stopping", signal.Signals(sig).name)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            try:
                await node.run()
            except DialError as exc:
                log.error("%s", exc)
                raise SystemExit(2) from None
            except OSError as exc:
                log.error("cannot start: %s", exc)
                raise SystemExit(2) from None
    log.info("stopped")


# --- client commands -----------------------------------------------------------------------
def _node_url(data_dir: Path) -> str:
    run_file = data_dir / "node.run.json"
    try:
        info = json.loads(run_file.read_text())
    except FileNotFoundError:
        fail(f"no running node for {data_dir} (start one with: rentahal-node run --data-dir {data_dir})")
    except (OSError, ValueError) as exc:
        fail(f"{run_file}: unreadable ({exc})")
    return str(info["ui"])


def _request(data_dir: Optional[Path], message: dict[str, Any]) -> dict[str, Any]:
    import trio
    from trio_websocket import HandshakeError, open_websocket_url

    url = _node_url(resolve_data_dir(data_dir))

    async def go() -> dict[str, Any]:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({**message, "rid": 1}))
            return json.loads(await ws.get_message())

    try:
        reply = trio.run(go)
    except (OSError, HandshakeError) as exc:
        fail(f"cannot reach the node at {url}: {exc}")
    if reply.get("op") == "error":
        fail(f"{reply.get('code')}: {reply.get('message')}")
    return reply


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-8:]}"


@app.command()
def peers(data_dir: Optional[Path] = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Peers the running node knows: state, score, realms, record age, RTT."""
    rows = _request(data_dir, {"op": "peers"})["peers"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'PEER':<52} {'STATE':<13} {'SCORE':>6} {'AGE':>6} {'RTT':>8}  REALMS")
    for p in rows:
        age = "-" if p["record_age_s"] is None else f"{p['record_age_s']:.1f}s"
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}ms"
        typer.echo(f"{p['peer_id']:<52} {p['state']:<13} {p['score']:>6.1f} {age:>6} {rtt:>8}  {','.join(p['realms']) or '-'}")


@app.command()
def realms(data_dir: Optional[Path] = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Realms served here and by how many live peers."""
    rows = _request(data_dir, {"op": "realms"})["realms"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'REALM':<9} {'LIVE PEERS':>10}  HERE")
    for r in rows:
        local = r["local"]
        here = "not served here" if local["status"] == "disabled" else local["status"]
        if local["status"] == "ready":
            here = f"serving {local['model']}" + (" (smoke-test model)" if local["smoke_test"] else "")
        typer.echo(f"{r['realm']:<9} {r['live_peers']:>10}  {here}")


@app.command()
def route(
    realm: str,
    data_dir: Optional[Path] = DataDir,
    explain: bool = typer.Option(False, "--explain", help="Also list excluded executors and why"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The executors a query for REALM would try now, in order."""
    plan = _request(data_dir, {"op": "route", "realm": realm})["route"]
    if as_json:
        typer.echo(json.dumps(plan, indent=2))
        return
    if not plan["candidates"]:
        typer.echo(f"no executor for {realm}")
    for i, c in enumerate(plan["candidates"], 1):
        note = f"  ({c['note']})" if c["note"] else ""
        typer.echo(f"{i}. {c['executor']}  score {c['score']:.1f}{note}")
    if explain:
        for x in plan["excluded"]:
            typer.echo(f"-  {x['executor']}  excluded: {x['reason']}")


@app.command()
def query(
    realm: str,
    prompt: str,
    data_dir: Optional[Path] = DataDir,
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens"),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate until --max-tokens"),
    stream: Optional[bool] = typer.Option(
        None, "--stream/--no-stream", help="Print tokens as they come [default: when stdout is a terminal]"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print every event as a JSON line"),
) -> None:
    """Ask the federation through the local node; the answer goes to stdout, routing to stderr."""
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

    payload: dict[str, Any] = {"prompt": prompt}
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            payload[key] = value
    if ignore_eos:
        payload["ignore_eos"] = True
    live = sys.stdout.isatty() if stream is None else stream
    url = _node_url(resolve_data_dir(data_dir))
    printed = [0]

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "executor":
            typer.echo(f"executor: {ev['executor']} (attempt {ev['attempt']})", err=True)
        elif kind == "failover":
            typer.echo(f"failover: {ev['executor']} {ev['kind']}: {ev['message']}", err=True)
            if live and printed[0]:
                sys.stdout.write("\n")
                printed[0] = 0
        elif kind == "token" and live:
            sys.stdout.write(ev["text"])
            sys.stdout.flush()
            printed[0] += 1

    async def go() -> dict[str, Any]:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "submit_query", "rid": 1, "realm": realm, "payload": payload}))
            while True:
                msg = json.loads(await ws.get_message())
                if as_json:
                    typer.echo(json.dumps(msg))
                if msg["op"] == "event":
                    if not as_json:
                        on_event(msg["event"])
                    continue
                return msg

    try:
        reply = trio.run(go)
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        fail(f"lost the node at {url}: {exc}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if reply["op"] == "error":
        fail(f"{reply['code']}: {reply['message']}", 1)
    result = reply["result"]
    if not as_json:
        if live:
            sys.stdout.write("\n")
        else:
            typer.echo(result["output"].get("text", json.dumps(result["output"])))
        stats = result.get("stats", {})
        typer.echo(
            f"answered by {result['executor']} in {stats.get('ms', 0):.0f} ms, {stats.get('tokens', '?')} tokens"
            + (f", after failover from {', '.join(result['failovers'])}" if result["failovers"] else ""),
            err=True,
        )


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    main()
