"""An operator's mistakes at start: each one stderr line naming the cause, exit 2, files unchanged.

Every case starts the real ``rentahal-node run`` and reads what it printed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from rentahal.scripts.federation import BIN, Federation


def run_node(
    data_dir: Path, *args: str, ui_port: int = 0, listen: str = "/ip4/127.0.0.1/tcp/0", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            BIN,
            "run",
            "--data-dir",
            str(data_dir),
            "--ui-port",
            str(ui_port),
            "--listen",
            listen,
            "--serve",
            "none",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    """The single line the node printed, checked to be an error with exit 2."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by content (the lock file is the node's own)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "node.lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def initialised(federation: Federation, name: str) -> Path:
    """A data dir that has run once (identity, config, databases), stopped again."""
    node = federation.start(name, serve="none")
    assert node.stop() == 0
    return node.data_dir


def test_two_nodes_on_one_data_dir(federation: Federation) -> None:
    a = federation.start("A", serve="none")
    before = {k: v for k, v in snapshot(a.data_dir).items() if not k.startswith("db/")}
    line = one_line(run_node(a.data_dir))
    assert "in use by another rentahal-node" in line and f"pid {a.proc.pid}" in line, line
    after = {k: v for k, v in snapshot(a.data_dir).items() if not k.startswith("db/")}
    assert after == before  # run file, identity, token and config: still the first node's
    assert a.cli("status", "--json").returncode == 0  # the first node is untouched


def test_p2p_port_taken(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_node(tmp_path / "n", listen=f"/ip4/127.0.0.1/tcp/{port}")
    line = one_line(res)
    assert f"/tcp/{port}" in line and "already in use" in line, line


def test_ui_port_taken(federation: Federation) -> None:
    data_dir = initialised(federation, "ui")
    before = snapshot(data_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_node(data_dir, ui_port=port)
    line = one_line(res)
    assert "ui.port" in line and str(port) in line and "already in use" in line, line
    assert snapshot(data_dir) == before


def test_corrupt_shard(federation: Federation) -> None:
    data_dir = initialised(federation, "corrupt")
    shard = next((data_dir / "db").glob("shard-0-of-*.sqlite"))
    data = bytearray(shard.read_bytes())
    data[100:4096] = os.urandom(4096 - 100)  # the header's tail and the schema page
    shard.write_bytes(bytes(data))
    before = snapshot(data_dir)
    line = one_line(run_node(data_dir))
    assert shard.name in line and "damaged" in line, line
    assert snapshot(data_dir) == before


def test_db_path_is_a_file(federation: Federation) -> None:
    data_dir = initialised(federation, "dbfile")
    shutil.rmtree(data_dir / "db")
    (data_dir / "db").write_text("not a folder\n")
    before = snapshot(data_dir)
    line = one_line(run_node(data_dir))
    assert str(data_dir / "db") in line and "is a file" in line, line
    assert snapshot(data_dir) == before


def test_data_dir_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.write_text("x\n")
    line = one_line(run_node(path))
    assert str(path) in line and "not a directory" in line, line
    assert path.read_text() == "x\n"


def test_full_disk_at_start(federation: Federation, tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("SKIPPED LOUDLY: a full disk needs a small tmpfs, which needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("SKIPPED LOUDLY: mount -t tmpfs failed (no CAP_SYS_ADMIN here)")
    try:
        data_dir = mnt / "node"
        subprocess.run([BIN, "init", "--data-dir", str(data_dir)], check=True, capture_output=True)
        with open(mnt / "filler", "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        before = snapshot(data_dir)
        line = one_line(run_node(data_dir))
        assert "disk is full" in line, line
        after = snapshot(data_dir)
        assert {k: after.get(k) for k in before} == before  # nothing it had was changed
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_files_are_private_in_a_dir_the_operator_made_0755(federation: Federation) -> None:
    data_dir = federation.root / "shared-home"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    old = os.umask(0o022)  # the node's children inherit a umask that would make files 0644
    try:
        node = federation.start("shared-home", serve="chat")
    finally:
        os.umask(old)
    node.cli("query", "chat", "a private prompt", "--max-tokens", "4")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.rglob("*") if not p.is_symlink()]
    assert any(p.name.startswith("shard-") for p in files)
    for p in [data_dir, *files]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}: others can read it"


def test_64_held_loopback_connections_do_not_lock_out_the_cli(federation: Federation) -> None:
    """Clients holding every ordinary place (64 per address) once locked the CLI out for as long
    as they held them: over the cap a client now gets 503 with Retry-After, and the CLI, which
    shows the sysop token in its request head, has places of its own."""
    import json
    import time

    import trio
    from trio_websocket import ConnectionRejected, open_websocket_url

    node = federation.start("held", serve="none")
    outcome: dict[str, object] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            release = trio.Event()

            async def hold() -> None:
                async with open_websocket_url(node.ui) as ws:
                    await ws.send_message(json.dumps({"op": "status", "rid": 1}))
                    await ws.get_message()
                    ready.release()
                    await release.wait()

            for _ in range(64):
                nursery.start_soon(hold)
            for _ in range(64):
                await ready.acquire()
            idle = [
                await trio.open_tcp_stream("127.0.0.1", int(node.ui.rsplit(":", 1)[1].strip("/"))) for _ in range(32)
            ]  # and sockets that never send a request
            try:
                async with open_websocket_url(node.ui):
                    outcome["65th"] = "accepted"
            except ConnectionRejected as exc:
                outcome["65th"] = exc.status_code
                outcome["retry"] = {k.decode().lower(): v.decode() for k, v in exc.headers}.get("retry-after")
            started = time.monotonic()
            res = await trio.to_thread.run_sync(lambda: node.cli("status", "--json", check=False))
            outcome["cli"] = (res.returncode, time.monotonic() - started, res.stderr)
            for s in idle:
                await s.aclose()
            release.set()

    trio.run(main)
    assert outcome["65th"] == 503 and outcome["retry"] == "5", outcome
    rc, seconds, stderr = outcome["cli"]
    assert rc == 0 and seconds < 10, stderr
