"""What an operator sees when the node cannot start (or must stop): one line naming the cause.

A failure the operator can act on (a port taken, a data dir in use, a corrupt or full disk, a bad
address) leaves ``trio.run`` wrapped in exception groups, one per nursery it crossed;
:func:`startup_failure` unwraps it to its cause. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import socket
import sqlite3
from collections.abc import Iterator


def check_ui_port(host: str, port: int) -> None:
    """Raise OSError (one line) if the UI's port is taken, before anything else starts."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(
                    exc.errno,
                    f"ui.port: {host}:{port} is already in use (another node or program; set ui.port or --ui-port)",
                ) from None
            raise OSError(
                exc.errno, f"ui.host/ui.port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for e in exc.exceptions:
            yield from leaves(e)
    else:
        yield exc


def cause_of(exc: BaseException) -> str | None:
    """One line for a failure the operator can act on; None for anything else."""
    from ..p2p.host import DialError, ListenError
    from ..p2p.identity import IdentityError
    from ..realms.events import StorageFailure
    from .config import ConfigError
    from .datadir import DataDirError

    if isinstance(exc, (DialError, ListenError, DataDirError, ConfigError, IdentityError, StorageFailure)):
        return str(exc)
    if isinstance(exc, sqlite3.DatabaseError):
        if "disk is full" in str(exc):
            return f"storage: the disk is full ({exc})"
        return f"storage: {exc} (run 'rentahal-node db check')"
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"the disk is full{where}: free some space and start again"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied{where}: {exc.strerror}"
        return f"cannot start: {exc.strerror or exc}{where}"
    return None


def startup_failure(exc: BaseException) -> str | None:
    """The operator's one line for ``exc`` (groups unwrapped), or None if it is a bug."""
    causes = [cause_of(e) for e in leaves(exc)]
    if not causes or any(c is None for c in causes):
        return None
    return causes[0]
