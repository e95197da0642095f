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
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from .node.config import resolve_data_dir
from .node.datadir import CLI_GUID_FILE, CONFIG_FILE, RUN_FILE, SYSOP_TOKEN_FILE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="A peer-to-peer federation node serving AI realms (chat, vision, imagine, speech).",
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"rentahal-node {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    """A peer-to-peer federation node serving AI realms (chat, vision, imagine, speech)."""


DataDir = typer.Option(
    None,
    "--data-dir",
    envvar="RENTAHAL_HOME",
    help="Node data dir [default: ~/.rentahal]",
    show_default=False,
)


def said(as_json: bool, data: dict[str, Any], text: str) -> None:
    """A command's outcome: one line for people, or the same facts as JSON for programs."""
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def ensure_initialised(data_dir: Path) -> tuple[str, bool]:
    """Create the data dir, identity, node.toml and sysop token where missing."""
    from .node.config import default_config_text
    from .node.datadir import DataDirError, make_private
    from .p2p.identity import IdentityError, load_or_create_identity, write_private_file

    try:
        make_private(data_dir)
        identity, created = load_or_create_identity(data_dir)
        config = data_dir / CONFIG_FILE
        if not config.exists():
            config.write_text(default_config_text())
        token = data_dir / SYSOP_TOKEN_FILE
        if not token.exists():
            write_private_file(token, (secrets.token_urlsafe(32) + "\n").encode())
    except (IdentityError, DataDirError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot initialise {data_dir}: {exc.strerror or exc}")
    return identity.peer_id, created


@app.command()
def init(
    data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON")
) -> None:
    """Create the data dir, the node's Ed25519 identity, node.toml and a sysop token."""
    path = resolve_data_dir(data_dir)
    peer_id, created = ensure_initialised(path)
    if not as_json:
        typer.echo(f"{'created' if created else 'existing'} node {peer_id} in {path}", err=True)
    said(as_json, {"peer_id": peer_id, "data_dir": str(path), "created": created}, peer_id)


@app.command()
def run(
    data_dir: Path | None = DataDir,
    listen: list[str] = typer.Option([], "--listen", help="Multiaddr to listen on (repeatable)"),
    bootstrap: list[str] = typer.Option([], "--bootstrap", help="Bootstrap multiaddr with /p2p/ (repeatable)"),
    ui_port: int | None = typer.Option(None, "--ui-port", help="Local websocket port (0 = any free)"),
    serve: str | None = typer.Option(None, "--serve", help="Realms to serve: REALM,... or none"),
    log_level: str | None = typer.Option(None, "--log-level", help="debug|info|warning|error"),
    log_format: str | None = typer.Option(None, "--log-format", help="text | json (one JSON object per line)"),
    set_: list[str] = typer.Option([], "--set", help="Override any node.toml key: KEY=VALUE (repeatable)"),
) -> None:
    """Run the node in the foreground until Ctrl-C or SIGTERM."""
    import trio

    from .node.config import REALMS, ConfigError, load_config, parse_set_option
    from .node.datadir import DataDirError, DataDirLock, make_private

    path = resolve_data_dir(data_dir)
    os.umask(0o077)  # every file the node writes (databases, models, the run file) is private
    try:
        make_private(path)
        lock = DataDirLock(path).acquire()  # held until the process exits
    except DataDirError as exc:
        fail(str(exc))
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
        if log_format is not None:
            overrides["node.log_format"] = json.dumps(log_format)
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
    from .node.startup import check_ui_port, startup_failure
    from .p2p.host import ListenError, check_port_free

    try:  # before anything starts or logs: a taken port is one line, not a half-started node
        check_port_free(config.p2p.listen)
        check_ui_port(config.ui.host, config.ui.port)
    except (OSError, ListenError) as exc:
        fail(str(exc))
    setup_logging(config.node.log_level, config.node.log_format)
    try:
        trio.run(_run_node, config, path)
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        cause = startup_failure(exc)
        if cause is None:
            raise
        logging.shutdown()
        fail(cause)
    finally:
        lock.release()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _exit_stuck(log: logging.Logger) -> None:
    from .node.limits import SHUTDOWN_TIMEOUT

    log.error("still stopping after %.0fs (a model backend is stuck); exiting now", SHUTDOWN_TIMEOUT)
    logging.shutdown()
    os._exit(1)


async def _run_node(config: Any, data_dir: Path) -> None:
    import trio

    from .node import limits
    from .node.daemon import Node
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
                    # A model stuck in native code cannot be interrupted: don't let it hang the stop.
                    timer = threading.Timer(limits.SHUTDOWN_TIMEOUT, _exit_stuck, args=(log,))
                    timer.daemon = True
                    timer.start()

            nursery.start_soon(stop_on_signal)
            await node.run()  # a failure leaves as an exception group: `run` unwraps it
            nursery.cancel_scope.cancel()
    log.info("stopped")


# --- client commands -----------------------------------------------------------------------
def _node_url(data_dir: Path) -> str:
    run_file = data_dir / RUN_FILE
    try:
        info = json.loads(run_file.read_text())
    except FileNotFoundError:
        fail(f"no running node for {data_dir} (start one with: rentahal-node run --data-dir {data_dir})")
    except (OSError, ValueError) as exc:
        fail(f"{run_file}: unreadable ({exc})")
    return str(info["ui"])


def _cli_guid(data_dir: Path) -> str:
    """This data dir's CLI user: one GUID, kept in ``cli.guid``."""
    import uuid

    from .p2p.identity import write_private_file

    path = data_dir / CLI_GUID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        guid = uuid.uuid4().hex
        write_private_file(path, (guid + "\n").encode())
        return guid


def _hello(data_dir: Path, *, sysop: bool) -> dict[str, Any]:
    hello: dict[str, Any] = {"guid": _cli_guid(data_dir)}
    if sysop:
        try:
            hello["sysop_token"] = (data_dir / SYSOP_TOKEN_FILE).read_text().strip()
        except OSError as exc:
            fail(f"this command needs the sysop token in {data_dir / SYSOP_TOKEN_FILE}: {exc.strerror}")
    return hello


def _run_client(go: Callable[[], Awaitable[dict[str, Any]]], url: str) -> dict[str, Any]:
    """Run a client coroutine (node/client.py); a node that cannot be reached, refuses or does not
    answer in time is one line and exit 2; an error answer is returned as the node sent it."""
    import trio
    from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

    from .node.client import CONNECT_TIMEOUT, NodeError

    try:
        return trio.run(go)
    except NodeError as exc:
        return {"op": "error", "code": exc.code, "message": exc.message}
    except ConnectionRejected as exc:
        retry = {k.decode().lower(): v.decode() for k, v in exc.headers or ()}.get("retry-after")
        fail(
            f"the node at {url} refused the connection ({exc.status_code})"
            + (f"; try again in {retry} s" if retry else "")
        )
    except trio.TooSlowError:
        fail(f"the node at {url} did not answer within {CONNECT_TIMEOUT:g} s")
    except (OSError, HandshakeError, ConnectionClosed) as exc:
        fail(f"cannot reach the node at {url}: {exc}")


def _request(data_dir: Path | None, message: dict[str, Any], *, sysop: bool = False) -> dict[str, Any]:
    from .node.client import connect

    path = resolve_data_dir(data_dir)
    url = _node_url(path)

    async def go() -> dict[str, Any]:
        async with connect(url, data_dir=path, **_hello(path, sysop=sysop)) as client:
            return await client.call(**message)

    reply = _run_client(go, url)
    if reply.get("op") == "error":
        fail(f"{reply.get('code')}: {reply.get('message')}", 1)
    return reply


def _rows(data_dir: Path | None, op: str, key: str, as_json: bool, *, sysop: bool = False) -> list[Any] | None:
    """A listing command's rows from the node, or None once they were printed as JSON."""
    rows: list[Any] = _request(data_dir, {"op": op}, sysop=sysop)[key]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return None
    return rows


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-8:]}"


def _who(peer_id: str, names: dict[str, str]) -> str:
    """A peer as people read it: the name it gives itself (its claim, not checked) beside its
    short ID; "local" for this node."""
    if peer_id == "local":
        return peer_id
    name = names.get(peer_id, "")
    return f"{name} ({_short(peer_id)})" if name else _short(peer_id)


def _names(data_dir: Path | None) -> dict[str, str]:
    return {p["peer_id"]: p.get("name") or "" for p in _request(data_dir, {"op": "peers"})["peers"]}


@app.command()
def peers(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Peers the running node knows: state, score, realms, record age, RTT."""
    rows = _rows(data_dir, "peers", "peers", as_json)
    if rows is None:
        return
    typer.echo(f"{'PEER':<19} {'NAME':<16} {'STATE':<13} {'SCORE':>6} {'AGE':>6} {'RTT':>8} {'PATH':<8} REALMS")
    for p in rows:
        age = "-" if p["record_age_s"] is None else f"{p['record_age_s']:.1f}s"
        rtt = "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}ms"
        why = f"  ({p['unreachable']})" if p.get("unreachable") else ""
        why += f"  (blocked: {p['blocked']})" if p.get("blocked") else ""
        why += f"  trusted for {','.join(p['trusted'])}" if p.get("trusted") else ""
        why += f"  allowed {','.join(p['allowed'])}" if p.get("allowed") else ""
        name = (p.get("name") or "-")[:16]
        typer.echo(
            f"{_short(p['peer_id']):<19} {name:<16} {p['state']:<13} {p['score']:>6.1f} {age:>6} {rtt:>8} "
            f"{p.get('path') or '-':<8} {','.join(p['realms']) or '-'}{why}"
        )


@app.command()
def realms(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Realms served here and by how many live peers."""
    rows = _rows(data_dir, "realms", "realms", as_json)
    if rows is None:
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
    data_dir: Path | None = DataDir,
    explain: bool = typer.Option(False, "--explain", help="Also list excluded executors and why"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The executors a query for REALM would try now, in order."""
    plan = _request(data_dir, {"op": "route", "realm": realm})["route"]
    if as_json:
        typer.echo(json.dumps(plan, indent=2))
        return
    names = _names(data_dir)
    if not plan["candidates"]:
        typer.echo(f"no executor for {realm}")
    for i, c in enumerate(plan["candidates"], 1):
        note = f"  ({c['note']})" if c["note"] else ""
        typer.echo(f"{i}. {_who(c['executor'], names)}  score {c['score']:.1f}{note}")
    if explain:
        for x in plan["excluded"]:
            typer.echo(f"-  {_who(x['executor'], names)}  excluded: {x['reason']}")


def _media(path: Path) -> dict[str, str]:
    import base64

    try:
        return {"$bytes": base64.b64encode(path.read_bytes()).decode("ascii")}
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}")


def _unmedia(value: Any) -> Any:
    import base64

    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value


@app.command()
def query(
    realm: str,
    prompt: str = typer.Argument("", help="The prompt (chat, vision, imagine) or the text to speak (speech)"),
    data_dir: Path | None = DataDir,
    image: Path | None = typer.Option(None, "--image", help="vision: the image to ask about"),
    audio: Path | None = typer.Option(None, "--audio", help="speech: audio to transcribe"),
    out: Path | None = typer.Option(None, "--out", help="imagine/speech: where to write the image or audio"),
    param: list[str] = typer.Option([], "--param", help="Any payload field: KEY=VALUE (TOML value; repeatable)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens"),
    temperature: float | None = typer.Option(None, "--temperature"),
    seed: int | None = typer.Option(None, "--seed"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate until --max-tokens"),
    stream: bool | None = typer.Option(
        None, "--stream/--no-stream", help="Print tokens as they come [default: when stdout is a terminal]"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print every event as a JSON line"),
    detach: bool = typer.Option(False, "--detach", help="Print the query ID once it is stored, and exit"),
) -> None:
    """Ask the federation through the local node; the answer goes to stdout (or --out), routing to stderr."""
    import tomllib

    from .realms.catalog import CATALOG, REALMS

    spec = CATALOG.get(realm)
    if spec is None:
        fail(f"unknown realm {realm!r}; expected one of {', '.join(REALMS)}")
    payload: dict[str, Any] = {}
    for name, path in (("image", image), ("audio", audio)):
        if path is not None:
            if name not in spec.media_fields:
                fail(f"--{name}: the {realm} realm takes no {name}")
            payload[name] = _media(path)
    if not (payload and spec.media_replaces_text):
        payload[spec.text_field] = prompt
    for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        if value is not None:
            payload[key] = value
    if ignore_eos:
        payload["ignore_eos"] = True
    for item in param:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            fail(f"--param {item!r}: expected KEY=VALUE")
        try:
            payload[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            payload[key.strip()] = raw
    live = sys.stdout.isatty() if stream is None else stream
    path = resolve_data_dir(data_dir)
    url = _node_url(path)
    printed = [0]
    names: dict[str, str] = {}

    def on_event(ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "routed":
            typer.echo(f"executor: {_who(ev['executor'], names)} (attempt {ev['attempt']})", err=True)
        elif kind == "failover":
            typer.echo(f"failover: {_who(ev['executor'], names)} {ev['kind']}: {ev['message']}", err=True)
            if live and printed[0]:
                sys.stdout.write("\n")
                printed[0] = 0
        elif kind == "progress" and ev["stage"] not in ("running",) and ev.get("total"):
            typer.echo(f"{ev['stage']}: {ev['done']}/{ev['total']}", err=True)
        elif kind == "token" and live:
            sys.stdout.write(ev["text"])
            sys.stdout.flush()
            printed[0] += 1

    from .node.client import connect

    async def go() -> dict[str, Any]:
        async with connect(url, data_dir=path, **_hello(path, sysop=False)) as client:
            if not as_json:  # peers' names, for the routing lines
                names.update({p["peer_id"]: p.get("name") or "" for p in (await client.call(op="peers"))["peers"]})
            async for msg in client.stream("submit_query", realm=realm, payload=payload, stream=bool(live or as_json)):
                if detach and msg.get("op") == "event" and msg["event"]["type"] == "queued":
                    return {"op": "detached", "query_id": msg["event"]["query_id"]}
                if as_json:
                    typer.echo(json.dumps(msg))
                if msg["op"] == "event":
                    if not as_json:
                        on_event(msg["event"])
                    continue
                return msg
        return {"op": "error", "code": "disconnected", "message": "the node closed the connection"}

    try:
        reply = _run_client(go, url)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if reply["op"] == "error":  # the request itself was wrong (exit 2), or nobody could answer it (1)
        fail(f"{reply['code']}: {reply['message']}", 2 if reply["code"] == "bad_request" else 1)
    if reply["op"] == "detached":
        typer.echo(reply["query_id"])
        return
    result = reply["result"]
    if as_json:
        return
    output = {k: _unmedia(v) for k, v in result["output"].items()}
    media = next(((k, v) for k, v in output.items() if isinstance(v, bytes)), None)
    if media is not None:
        key, data = media
        target = out or Path(f"{result['query_id']}.{'png' if key == 'image' else 'wav'}")
        try:
            target.write_bytes(data)
        except OSError as exc:
            fail(f"{target}: {exc.strerror or exc}")
        typer.echo(str(target))
    elif live:
        sys.stdout.write("\n")
    else:
        typer.echo(output.get("text", ""))
    stats = result.get("stats", {})
    typer.echo(
        f"answered by {_who(result['executor'], names)} in {stats.get('ms', 0):.0f} ms"
        + (f", {stats['tokens']} tokens" if "tokens" in stats else "")
        + (
            f", after failover from {', '.join(_who(f, names) for f in result['failovers'])}"
            if result["failovers"]
            else ""
        ),
        err=True,
    )


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    return f"{d}d {h}h {m}m" if d else f"{h}h {m}m {s % 60}s" if h else f"{m}m {s % 60}s" if m else f"{s}s"


@app.command()
def status(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """This node: peer ID, version, uptime, whether peers can reach it, and how a friend joins."""
    st = _request(data_dir, {"op": "status"})["status"]
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    reach = st["reachability"]
    typer.echo(f"peer ID       {st['peer_id']}" + (f"  ({st['name']})" if st.get("name") else ""))
    typer.echo(f"version       {st['version']}")
    typer.echo(f"uptime        {_duration(st['uptime_s'])}")
    typer.echo(f"reachability  {reach['text']}")
    typer.echo(f"addresses     {', '.join(st['addrs']) or '-'}")
    typer.echo(f"web UI        {st['ui']}")
    if reach["bootstrap"]:
        typer.echo(f"a friend joins with:\n  rentahal-node run --bootstrap {reach['bootstrap']}")


@app.command()
def stats(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Per-realm statistics of this node (they survive restarts)."""
    rows = _rows(data_dir, "stats", "stats", as_json)
    if rows is None:
        return
    typer.echo("executed here (since the data dir began) | asked by this node's users (since start)")
    typer.echo(
        f"{'REALM':<9} {'LOCAL':>6} {'PEERS':>6} {'FAILED':>6} {'CANCEL':>6} {'AVG MS':>8} {'P95 MS':>8} {'COST':>9} "
        f"{'QUEUE':>5} | {'ASKED':>6} {'BY PEER':>7} {'FAILED':>6}"
    )
    for realm, r in rows.items():
        typer.echo(
            f"{realm:<9} {r.get('served_local', 0):>6} {r.get('served_for_peers', 0):>6} {r.get('failures', 0):>6} "
            f"{r.get('cancelled', 0):>6} {r.get('avg_ms') or 0:>8.1f} {r.get('p95_ms') or 0:>8.1f} "
            f"{r.get('total_cost', 0):>9.3f} {r['queue_depth']:>5} | {r.get('asked_done', 0):>6} "
            f"{r.get('answered_by_peers', 0):>7} {r.get('asked_failed', 0):>6}"
        )


@app.command()
def history(
    data_dir: Path | None = DataDir,
    user: str | None = typer.Option(None, "--user", help="A user's GUID (sysop); default: this CLI's own"),
    all_users: bool = typer.Option(False, "--all", help="Every user's queries (sysop)"),
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Queries and their outcome, newest first."""
    message: dict[str, Any] = {"op": "history", "limit": limit}
    if user:
        message["user"] = user
    if all_users:
        message["all"] = True
    rows = _request(data_dir, message, sysop=bool(user or all_users))["history"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        executor = _short(r["executor"]) if r.get("executor") else "-"
        typer.echo(f"{r['id']}  {r['status']:<9} {r['realm']:<7} {executor:<19}  {(r.get('prompt') or '')[:40]!r}")
        if r.get("error_code"):  # why it failed (or was cancelled)
            typer.echo(f"    {r['error_code']}: {(r.get('error_message') or '')[:300]}")
        if r.get("suspect"):
            typer.echo(f"    ! {r['suspect']}")


@app.command()
def report(
    query_id: str,
    data_dir: Path | None = DataDir,
    reason: str = typer.Option("", "--reason", help="What was wrong with the answer (at most 200 characters)"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Report an answer as wrong: held against the peer that gave it, which is spot-checked at once."""
    ans = _request(data_dir, {"op": "report", "query_id": query_id, "reason": reason})
    ans.pop("rid", None)
    said(as_json, ans, f"reported the answer of {_short(ans['executor'])} to {query_id}; a spot-check of it is queued")


@app.command()
def cancel(
    query_id: str,
    data_dir: Path | None = DataDir,
    as_sysop: bool = typer.Option(False, "--sysop", help="Cancel another user's query (sysop token)"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Cancel a running or queued query of yours (another user's with --sysop)."""
    _request(data_dir, {"op": "cancel", "query_id": query_id}, sysop=as_sysop)
    said(as_json, {"query_id": query_id, "cancelled": True}, f"cancelled {query_id}")


@app.command()
def users(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Users of this node (sysop)."""
    rows = _rows(data_dir, "users", "users", as_json, sysop=True)
    if rows is None:
        return
    typer.echo(f"{'GUID':<32}  {'NICKNAME':<20} {'QUERIES':>7} {'COST':>9}  BANNED")
    for u in rows:
        typer.echo(
            f"{u['guid']:<32}  {(u['nickname'] or '-'):<20} {u['queries']:>7} {u['total_cost']:>9.3f}  {'yes' if u['banned'] else ''}"  # noqa: E501
        )


@app.command()
def ban(
    guid: str,
    data_dir: Path | None = DataDir,
    reason: str = typer.Option("", "--reason"),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Ban a user from this node (sysop)."""
    _request(data_dir, {"op": "ban", "guid": guid, "reason": reason}, sysop=True)
    said(as_json, {"guid": guid, "banned": True, "reason": reason}, f"banned {guid}")


@app.command()
def unban(
    guid: str,
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Lift a ban (sysop)."""
    _request(data_dir, {"op": "unban", "guid": guid}, sysop=True)
    said(as_json, {"guid": guid, "banned": False}, f"unbanned {guid}")


@app.command()
def realm(
    name: str,
    action: str = typer.Argument(..., help="enable | disable"),
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Enable or disable serving a realm on this node (sysop)."""
    if action not in ("enable", "disable"):
        fail(f"action must be enable or disable, got {action!r}")
    _request(data_dir, {"op": "set_realm", "realm": name, "enabled": action == "enable"}, sysop=True)
    said(as_json, {"realm": name, "enabled": action == "enable"}, f"{name} {action}d")


@app.command()
def peer(
    peer_id: str,
    action: str = typer.Argument(..., help="block | unblock"),
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Block or unblock a peer: it gets no queries from this node and its queries are refused (sysop)."""
    if action not in ("block", "unblock"):
        fail(f"action must be block or unblock, got {action!r}")
    _request(data_dir, {"op": "set_peer", "peer_id": peer_id, "blocked": action == "block"}, sysop=True)
    said(as_json, {"peer_id": peer_id, "blocked": action == "block"}, f"{peer_id} {action}ed")


@app.command()
def audit(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """The sysop's actions on this node, newest first (sysop)."""
    rows = _rows(data_dir, "audit", "audit", as_json, sysop=True)
    if rows is None:
        return
    typer.echo(f"{'WHEN (UTC)':<19}  {'ACTOR':<6} {'ACTION':<16} {'TARGET':<34} DETAIL")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        typer.echo(f"{when:<19}  {r['actor']:<6} {r['action']:<16} {r['target']:<34} {r['detail']}")


keys_app = typer.Typer(help="API keys for the OpenAI-compatible API (sysop).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who the key is for (shown in lists and the audit log)"),
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Make a key; it is printed once and only its hash is kept. Each key is a user of its own."""
    ans = _request(data_dir, {"op": "keys_create", "name": name}, sysop=True)
    if as_json:
        typer.echo(json.dumps({k: ans[k] for k in ("id", "name", "user", "key")}, indent=2))
        return
    typer.echo(ans["key"])
    typer.echo(f"key {ans['id']} for {ans['name']!r} (user {ans['user']}): shown once, keep it now", err=True)


@keys_app.command("list")
def keys_list(data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json")) -> None:
    """Every key: its id, name, user and whether it is revoked (never the key itself)."""
    rows = _rows(data_dir, "keys_list", "keys", as_json, sysop=True)
    if rows is None:
        return
    typer.echo(f"{'ID':<9} {'NAME':<24} {'USER':<32}  {'CREATED (UTC)':<19}  STATE")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        state = "revoked" if r["revoked_at"] else "live"
        typer.echo(f"{r['id']:<9} {r['name'][:24]:<24} {r['user_guid']:<32}  {created:<19}  {state}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str,
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Revoke a key (by the id `keys list` shows): refused from the next request on."""
    _request(data_dir, {"op": "keys_revoke", "key_id": key_id}, sysop=True)
    said(as_json, {"key_id": key_id, "revoked": True}, f"revoked key {key_id}")


from .models.cli_models import models_app  # noqa: E402  (a sub-app, mounted below)

app.add_typer(models_app, name="models")

db_app = typer.Typer(help="The node's SQLite databases (offline commands need the node stopped).")
app.add_typer(db_app, name="db")


@db_app.command("check")
def db_check(
    data_dir: Path | None = DataDir, as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON")
) -> None:
    """Check the integrity of every shard and of the node database."""
    from .node.storage import check

    path = resolve_data_dir(data_dir)
    verdicts = list(check(path))
    for name, verdict in verdicts if not as_json else ():
        typer.echo(f"{name}: {verdict}")
    if as_json:
        typer.echo(json.dumps(dict(verdicts), indent=2))
    if any(verdict != "ok" for _, verdict in verdicts):
        raise typer.Exit(1)


@db_app.command("reshard")
def db_reshard(
    shards: int = typer.Option(..., "--shards", min=1, max=64),
    data_dir: Path | None = DataDir,
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON"),
) -> None:
    """Move every user's rows to a new number of shards (node stopped), and record it."""
    from .node.config import ConfigError, load_config
    from .node.datadir import holder
    from .node.storage import StorageError, reshard

    path = resolve_data_dir(data_dir)
    pid = holder(path)
    if pid:
        fail(f"a node (pid {pid}) is running on {path}; stop it first")
    try:
        old, moved = reshard(path, shards)
    except StorageError as exc:
        fail(str(exc))
    said(as_json, {"old_shards": old, "shards": shards, "rows_moved": moved},
         f"resharded {path}: {old} -> {shards} shards, {moved} rows moved")  # fmt: skip
    try:
        cfg = load_config(path / CONFIG_FILE)
    except ConfigError:
        return
    if cfg.storage.shards != shards:
        typer.echo(f"now set storage.shards = {shards} in {path / CONFIG_FILE}", err=True)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        os._exit(0)


if __name__ == "__main__":
    main()
