"""The one way tests and benchmarks start a local federation: `rentahal-node run` processes on loopback.

Readiness and state changes are read from each node's log as they happen (a reader thread
feeds the lines to waiters), so nothing sleeps hoping the other side is ready.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BIN = str(Path(sys.executable).with_name("rentahal-node"))
if not Path(BIN).exists():
    BIN = shutil.which("rentahal-node") or BIN
START_TIMEOUT = 60.0


class NodeProcess:
    def __init__(
        self,
        data_dir: Path,
        *,
        serve: str = "chat",
        bootstrap: tuple[str, ...] = (),
        settings: dict[str, str] | None = None,
        name: str = "",
        netns: str = "",
        listen: str | None = "/ip4/127.0.0.1/tcp/0",
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.serve = serve
        self.bootstrap = bootstrap
        self.settings = dict(settings or {})
        self.name = name or data_dir.name
        self.netns = netns  # run inside this network namespace (a testbed host), CLI included
        self.listen = listen  # None: the node's default (node.toml's p2p.listen)
        self.env = dict(env or {})  # added to this process's environment
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._started_at_line = 0
        self._reader: threading.Thread | None = None
        self._cond = threading.Condition()
        self.peer_id = ""
        self.addr = ""
        self.ui = ""

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> NodeProcess:
        return self.launch().wait_ready()

    def launch(self) -> NodeProcess:
        args = [*self._prefix(), BIN, "run", "--data-dir", str(self.data_dir), "--ui-port", "0", "--serve", self.serve]
        if self.listen is not None:
            args += ["--listen", self.listen]
        for b in self.bootstrap:
            args += ["--bootstrap", b]
        for k, v in self.settings.items():
            args += ["--set", f"{k}={v}"]
        if self._reader is not None:  # the last run's lines, "<exited>" included, are all in
            self._reader.join(10)
        self._started_at_line = self.mark()  # a restart waits for this run's lines, not the last's
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def wait_ready(self) -> NodeProcess:
        """Network up, then every realm it serves loaded (models load after the network)."""
        since = self._started_at_line
        m = self.wait_for(r"ready peer=(\S+) ui=(\S+)", START_TIMEOUT, after=since)
        self.peer_id, self.ui = m.group(1), m.group(2)
        self.addr = self.wait_for(r"listening on (\S+)", 1, after=since).group(1)
        for realm in self.serve.split(","):
            if realm not in ("", "none"):
                self.wait_for(rf"{realm}: (serving|not served)", START_TIMEOUT, after=since)
        return self

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<exited>")
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, *, after: int = 0) -> re.Match[str]:
        """Block until a log line (from index ``after`` on) matches ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = after
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        return m
                    if self.lines[i - 1] == "<exited>":
                        raise AssertionError(f"{self.name} exited waiting for {pattern!r}:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s:\n{self.log()}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    # --- the CLI against this node -----------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*self._prefix(), BIN, *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"rentahal-node {' '.join(args)} exited {res.returncode}:\n{res.stderr}")
        return res

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def peer(self, peer_id: str) -> dict[str, Any] | None:
        return next((p for p in self.cli_json("peers") if p["peer_id"] == peer_id), None)

    def query_process(self, realm: str, prompt: str, *args: str) -> subprocess.Popen[str]:
        """Start `rentahal-node query ... --json`; its stdout is one JSON message per line."""
        return subprocess.Popen(
            [*self._prefix(), BIN, "query", realm, prompt, "--json", *args, "--data-dir", str(self.data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


class Federation:
    """Nodes started for one test, all stopped at its end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[NodeProcess] = []

    def start(self, name: str, **kw: Any) -> NodeProcess:
        return self.start_many([name], **kw)[0]

    def launch(self, name: str, **kw: Any) -> NodeProcess:
        """Start a node without waiting for it (``wait_ready`` later)."""
        node = NodeProcess(self.root / name, name=name, **kw)
        self.nodes.append(node)
        return node.launch()

    def start_many(self, names: list[str], **kw: Any) -> list[NodeProcess]:
        """Launch several nodes at once (start-up is mostly imports), then wait for each."""
        nodes = [NodeProcess(self.root / n, name=n, **kw) for n in names]
        self.nodes.extend(nodes)
        for n in nodes:
            n.launch()
        return [n.wait_ready() for n in nodes]

    def close(self) -> None:
        for n in self.nodes:
            n.stop()


class NodeError(Exception):
    """An ``error`` answer from a node: ``code`` and ``message`` as the node sent them."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NodeClient:
    """A client of a node's local websocket, speaking the protocol the CLI and the UI speak.

    A reader task hands each message to the request it answers (by ``rid``), so several
    requests and query streams can be in flight on one connection.
    """

    def __init__(self, ws: Any) -> None:
        import itertools

        import trio

        self.ws = ws
        self._rids = itertools.count(1)
        self._routes: dict[int, Any] = {}
        self._trio = trio

    async def _read(self) -> None:
        from trio_websocket import ConnectionClosed

        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                route = self._routes.get(msg.get("rid"))
                if route is not None:
                    route.send_nowait(msg)
        except ConnectionClosed:  # the node went away: every open request ends
            for route in self._routes.values():
                route.close()

    def _open(self) -> tuple[int, Any]:
        rid = next(self._rids)
        send, receive = self._trio.open_memory_channel[dict[str, Any]](float("inf"))
        self._routes[rid] = send
        return rid, receive

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        rid, receive = self._open()
        try:
            await self.ws.send_message(json.dumps({"op": op, "rid": rid, **fields}))
            msg = await receive.receive()
        finally:
            self._routes.pop(rid, None)
        if msg["op"] == "error":
            raise NodeError(msg["code"], msg["message"])
        return msg

    async def stream(self, op: str, **fields: Any) -> Any:
        """Yield every message answering this request, up to its ``result`` or ``error``."""
        rid, receive = self._open()
        try:
            await self.ws.send_message(json.dumps({"op": op, "rid": rid, **fields}))
            while True:
                msg = await receive.receive()
                yield msg
                if msg["op"] in ("result", "error"):
                    return
        finally:
            self._routes.pop(rid, None)


def connect(url: str, **hello: Any) -> Any:
    """``async with connect(node.ui, guid=...) as client``: a NodeClient that has said hello."""
    from contextlib import asynccontextmanager

    import trio
    from trio_websocket import open_websocket_url

    @asynccontextmanager
    async def session() -> Any:
        async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
            # Hello before the reader starts, so a refusal surfaces as a plain NodeError.
            await ws.send_message(json.dumps({"op": "hello", "rid": 0, **hello}))
            welcome = json.loads(await ws.get_message())
            if welcome["op"] == "error":
                raise NodeError(welcome["code"], welcome["message"])
            async with trio.open_nursery() as nursery:
                client = NodeClient(ws)
                client.welcome = welcome
                nursery.start_soon(client._read)
                yield client
                nursery.cancel_scope.cancel()

    return session()
