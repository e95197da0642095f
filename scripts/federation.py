"""The one way tests and benchmarks start a local federation: `rentahal-node run` processes on loopback.

A node is ready when its run file names this process and says each realm it serves is loaded
(the node rewrites it as realms load; node/client.py reads it); state changes are read from its
log as they happen (a reader thread feeds the lines to waiters), so nothing sleeps hoping the
other side is ready. Clients of a node's websocket come from node/client.py, re-exported here.
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

from ..node.client import NodeClient, NodeError, connect, read_run_file

__all__ = ["Federation", "NodeClient", "NodeError", "NodeProcess", "connect"]

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
        """Network up (the run file this process wrote once it was ready), then every realm it
        serves loaded or given up on (its /healthz): learnt from the node, not its log wording."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        info = None
        while info is None or info.get("pid") != self.proc.pid:
            self._check_alive("a run file", deadline)
            time.sleep(0.02)  # polling the file the node writes when it is ready
            info = read_run_file(self.data_dir)
        self.peer_id, self.ui, self.addr = info["peer_id"], info["ui"], info["addrs"][0]
        wanted = [r for r in self.serve.split(",") if r not in ("", "none")]
        while True:  # the run file is rewritten as realms load (a netns node's UI is not reachable here)
            realms = (read_run_file(self.data_dir) or {}).get("realms", {})
            if all(realms.get(r) not in (None, "loading", "restarting") for r in wanted):
                return self
            self._check_alive(f"realms {wanted} loaded (now {realms})", deadline)
            time.sleep(0.05)  # polling the run file while models load

    def _check_alive(self, waiting_for: str, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            if self._reader is not None:
                self._reader.join(5)
            raise AssertionError(f"{self.name} exited waiting for {waiting_for}:\n{self.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{self.name}: no {waiting_for} within {START_TIMEOUT}s:\n{self.log()}")

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
