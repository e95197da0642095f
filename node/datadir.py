"""The data dir: what lives where in it, who may read it, and which process may use it.

Layout (every path the node, the CLI and the tests use comes from here)::

    <data dir>/              0700
        node.toml            the operator's settings
        identity.key         the node's Ed25519 key (0600)
        sysop.token          the local sysop's token (0600)
        cli.guid             the CLI's user id (0600)
        node.lock            held (flock) by the one node process running on this dir
        node.run.json        written when the node is ready: pid, peer id, UI URL, addresses
        db/                  node.sqlite and the shard files (0600)
        models/              models the node made or pulled

The node's files are private whatever the umask or the mode of a dir the operator made: a
stored prompt is the user's, and the key and the token are the node's.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..p2p.identity import IDENTITY_FILE

CONFIG_FILE = "node.toml"
SYSOP_TOKEN_FILE = "sysop.token"
CLI_GUID_FILE = "cli.guid"
LOCK_FILE = "node.lock"
RUN_FILE = "node.run.json"
DB_DIR = "db"
MODELS_DIR = "models"
PRIVATE_FILES = (IDENTITY_FILE, SYSOP_TOKEN_FILE, CLI_GUID_FILE, CONFIG_FILE, RUN_FILE, LOCK_FILE)


class DataDirError(Exception):
    """The data dir cannot be used; the message is one line naming the path and the cause."""


def make_private(path: Path) -> None:
    """Create ``path`` (mode 0700) if needed and make it and the node's files in it private:
    0700 for dirs, 0600 for files (the top level and ``db/``). A pre-existing dir the operator
    made 0755 is tightened, not trusted."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise DataDirError(f"data dir {path} is a file, not a directory") from None
    except OSError as exc:
        raise DataDirError(f"cannot create data dir {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise DataDirError(f"data dir {path} is not a directory")
    _tighten(path, 0o700)
    for name in PRIVATE_FILES:
        _tighten(path / name, 0o600)
    db = path / DB_DIR
    if db.is_dir():
        _tighten(db, 0o700)
        for f in db.iterdir():
            _tighten(f, 0o600)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DataDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return  # not ours to change (a link the operator made, another user's file)
    if stat.S_IMODE(st.st_mode) & ~mode:
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
        except OSError as exc:
            raise DataDirError(f"cannot make {path} private: {exc.strerror or exc}") from None


class DataDirLock:
    """An exclusive lock on a data dir, held for the life of the process that took it: two nodes
    on one data dir would share a peer ID and its databases and resume the same queries."""

    def __init__(self, path: Path) -> None:
        self.path = path / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise DataDirError(
                    f"data dir {self.path.parent} is in use by another rentahal-node ({who}); "
                    "stop it, or give this node its own --data-dir"
                ) from None
            raise DataDirError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        try:  # the holder's pid, for the message above (best effort: a full disk keeps the lock)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holder(path: Path) -> int | None:
    """The pid of the node holding ``path``'s lock, or None if no node holds it."""
    import fcntl

    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_pid(fd)
        return None
    finally:
        os.close(fd)
