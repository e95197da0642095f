"""The node's SQLite storage: user data sharded by a stable hash of the user GUID, plus one
node-wide database for peers, stats, settings and audit.

Each database file has one connection, used only from worker threads and one call at a time
(a `trio.CapacityLimiter(1)` per file): the event loop never waits on SQLite, calls to one file
are serialized and different shards run in parallel. Writes to a file are group-committed: the
writes that queue up while one transaction runs go together into the next one (each in its own
savepoint, so one failing write does not undo the others). A query costs two write
transactions: stored before it is routed, finished (with its status history) after. Realm
counters are kept in memory and flushed once a second. A full disk raises ``StorageFull``.
Other processes may open the same files: WAL, a busy timeout and `BEGIN IMMEDIATE` for every
write keep them out of each other's way.
Values are always bound parameters; SQL is only ever formatted with our own identifiers.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import math
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import trio
from sqlite_utils import Database

from ..realms.events import StorageFailure, StorageFull
from .limits import DURATIONS_KEPT
from .limits import SQLITE_BUSY_TIMEOUT as BUSY_TIMEOUT_S

QUERY_STATUSES = ("queued", "routed", "running", "done", "failed", "cancelled")
UNFINISHED = ("queued", "routed", "running")
NODE_FILE = "node.sqlite"
_SHARD_FILE = re.compile(r"^shard-(\d+)-of-(\d+)\.sqlite(\.tmp)?(-wal|-shm|-journal)?$")

T = TypeVar("T")
Row = dict[str, Any]
Migration = str | Callable[[Database], None]  # a SQL script, or a function of the database


class StorageError(StorageFailure):
    """A storage problem the person running the node can act on; the message is one line."""


def _classify(exc: Exception) -> Exception:
    """SQLite's and the OS's errors as this node's storage failures (one line each)."""
    if isinstance(exc, StorageFailure):
        return exc
    text = str(exc)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "disk is full" in text:
        return StorageFull(f"storage full: {text}")
    if isinstance(exc, (sqlite3.Error, OSError)):
        return StorageError(f"storage failed: {text or type(exc).__name__}")
    return exc


@dataclass
class _Write:
    fn: Callable[[Database], Any]
    done: bool = False
    value: Any = None
    error: Exception | None = None


def _commit(db: Database, batch: list[_Write]) -> None:
    """Run the batch in one transaction, each write in a savepoint of its own."""
    try:
        with _write(db):
            for w in batch:
                db.conn.execute("SAVEPOINT w")
                try:
                    w.value = w.fn(db)
                    db.conn.execute("RELEASE w")
                except Exception as exc:
                    if not db.conn.in_transaction:  # SQLite undid it all (e.g. a full disk)
                        raise
                    db.conn.execute("ROLLBACK TO w")
                    db.conn.execute("RELEASE w")
                    w.error = _classify(exc)
    except Exception as exc:  # BEGIN or COMMIT failed: none of them happened
        for w in batch:
            w.error, w.value = _classify(exc), None
    for w in batch:
        w.done = True


MIGRATIONS_SHARD: list[Migration] = [
    """
    CREATE TABLE users (
        guid TEXT PRIMARY KEY, nickname TEXT, created_at REAL NOT NULL,
        banned INTEGER NOT NULL DEFAULT 0 CHECK (banned IN (0, 1)),
        ban_reason TEXT NOT NULL DEFAULT '', queries INTEGER NOT NULL DEFAULT 0,
        total_cost REAL NOT NULL DEFAULT 0, total_ms REAL NOT NULL DEFAULT 0);
    CREATE INDEX users_created_at ON users (created_at);
    CREATE TABLE queries (
        id TEXT PRIMARY KEY, user_guid TEXT NOT NULL REFERENCES users (guid),
        realm TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        deadline_at REAL NOT NULL, executor TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        failovers TEXT NOT NULL DEFAULT '[]', error_code TEXT, error_message TEXT,
        processing_ms REAL, cost REAL);
    CREATE INDEX queries_status ON queries (status);
    CREATE INDEX queries_user_created ON queries (user_guid, created_at);
    CREATE INDEX queries_created ON queries (created_at);
    CREATE TABLE query_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, query_id TEXT NOT NULL REFERENCES queries (id),
        status TEXT NOT NULL, at REAL NOT NULL, executor TEXT, detail TEXT NOT NULL DEFAULT '');
    CREATE INDEX query_events_query ON query_events (query_id);
    CREATE TABLE results (
        query_id TEXT PRIMARY KEY REFERENCES queries (id), output BLOB NOT NULL,
        stats TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
    """,
]

MIGRATIONS_NODE: list[Migration] = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE peers (
        peer_id TEXT PRIMARY KEY, addrs TEXT NOT NULL DEFAULT '[]', first_seen REAL NOT NULL,
        last_seen REAL, blocked INTEGER NOT NULL DEFAULT 0, note TEXT NOT NULL DEFAULT '');
    CREATE INDEX peers_blocked ON peers (blocked);
    CREATE TABLE realm_settings (realm TEXT PRIMARY KEY, enabled INTEGER NOT NULL);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '');
    CREATE TABLE realm_stats (
        realm TEXT PRIMARY KEY, served_local INTEGER NOT NULL DEFAULT 0,
        served_for_peers INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0, total_ms REAL NOT NULL DEFAULT 0,
        total_cost REAL NOT NULL DEFAULT 0);
    CREATE TABLE durations (
        id INTEGER PRIMARY KEY AUTOINCREMENT, realm TEXT NOT NULL, ms REAL NOT NULL,
        at REAL NOT NULL);
    CREATE INDEX durations_realm ON durations (realm, id);
    """,
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, user_guid TEXT NOT NULL,
        created_at REAL NOT NULL, revoked_at REAL);
    """,
]


def shard_for(guid: str, n: int) -> int:
    """The shard of a user: stable across processes, machines and Python versions."""
    digest = hashlib.sha256(guid.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % n


def shard_file(i: int, n: int) -> str:
    return f"shard-{i}-of-{n}.sqlite"


# --- one file -------------------------------------------------------------------------------


def _connect(path: Path) -> Database:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
    db = Database(conn, execute_plugins=False)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    # Before anything writes to it: a damaged file is named and left as it is, not "repaired".
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        conn.close()
        raise StorageError(
            f"{path} is damaged ({'; '.join(problems[:2])}); the node left it untouched: restore it "
            "from a backup or move it aside ('rentahal-node db check' lists every file)"
        )
    # Switching a new file to WAL can fail at once with "database is locked" (SQLite skips the
    # busy handler where waiting could deadlock) while another process creates the same file:
    # retry within the busy timeout. This runs in a worker thread, never on the event loop.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.enable_wal()
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    return db


@contextmanager
def _write(db: Database) -> Iterator[None]:
    """A write transaction that takes the write lock up front, so that the busy timeout covers
    it (a deferred transaction upgrading later can fail with SQLITE_BUSY at once)."""
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")
        raise


def _migrate(db: Database, migrations: list[Migration], name: str) -> None:
    """Applies the migrations above the file's user_version, one transaction each."""
    while True:
        with _write(db):
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise StorageError(
                    f"{name} has schema version {version}, written by a newer rentahal-node "
                    f"(this one knows up to {len(migrations)})"
                )
            if version == len(migrations):
                return
            step = migrations[version]
            db.executescript(step) if isinstance(step, str) else step(db)
            db.execute(f"PRAGMA user_version = {version + 1:d}")


def _open_file(path: Path, migrations: list[Migration]) -> Database:
    db = _connect(path)
    try:
        _migrate(db, migrations, path.name)
    except BaseException:
        db.close()
        raise
    return db


class _File:
    """One database file. Its connection is only touched in a worker thread holding `limiter`;
    calls are not abandoned on cancel, so no two threads ever use it at once."""

    def __init__(self, path: Path, db: Database) -> None:
        self.path, self.db, self.limiter = path, db, trio.CapacityLimiter(1)
        self._pending: list[_Write] = []
        self._writing = False
        self._batch_done = trio.Event()

    async def run(self, fn: Callable[[Database], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, self.db, limiter=self.limiter)
        except Exception as exc:
            raise _classify(exc) from None

    async def write(self, fn: Callable[[Database], T]) -> T:
        """`fn` inside a write transaction, committed together with the writes queued beside it."""
        w = _Write(fn)
        self._pending.append(w)
        while not w.done:
            if self._writing:  # another task commits the current batch; ours is in the next
                await self._batch_done.wait()
                continue
            self._writing = True
            batch, self._pending = self._pending, []
            try:
                with trio.CancelScope(shield=True):  # a batch in flight finishes, whoever asked
                    await trio.to_thread.run_sync(_commit, self.db, batch, limiter=self.limiter)
            finally:
                self._writing = False
                done, self._batch_done = self._batch_done, trio.Event()
                done.set()
        if w.error is not None:
            raise w.error
        return w.value  # type: ignore[no-any-return]

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """One statement (its own transaction); returns the number of rows changed."""
        return await self.run(lambda db: db.execute(sql, params).rowcount)

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return await self.run(lambda db: list(db.query(sql, params)))


async def _all(fn: Callable[[int], Awaitable[None]], n: int) -> None:
    """`fn(0)` … `fn(n - 1)` concurrently; a failure comes out as itself, not as a group."""
    try:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(fn, i)
    except BaseExceptionGroup as group:
        first = next((e for e in group.exceptions if isinstance(e, Exception)), None)
        if first is None:
            raise
        raise first from group


# --- rows -----------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False)


def _user(row: Row) -> Row:
    row["banned"] = bool(row["banned"])
    return row


def _query(row: Row) -> Row:
    row["payload"], row["failovers"] = _unpack(row["payload"]), json.loads(row["failovers"])
    return row


@dataclass(frozen=True)
class QueryEvent:
    """One step of a query's status history, kept in memory until the query ends."""

    status: str
    at: float
    executor: str | None = None
    detail: str = ""


def _log_events(db: Database, query_id: str, events: list[QueryEvent]) -> None:
    db.conn.executemany(
        "INSERT INTO query_events (query_id, status, at, executor, detail) VALUES (?, ?, ?, ?, ?)",
        [(query_id, e.status, e.at, e.executor, e.detail) for e in events],
    )


def _one(db: Database, sql: str, params: tuple[Any, ...]) -> Row | None:
    return next(db.query(sql, params), None)


def _recorded_shards(db: Database) -> int | None:
    row = db.execute("SELECT value FROM settings WHERE key = 'shard_count'").fetchone()
    return None if row is None else int(row[0])


def _open_node(db_dir: Path, shards: int) -> Database:
    if db_dir.exists() and not db_dir.is_dir():
        raise StorageError(f"{db_dir} is a file, not the node's database folder: move it aside")
    db_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = _open_file(db_dir / NODE_FILE, MIGRATIONS_NODE)
    try:
        with _write(db):
            recorded = _recorded_shards(db)
            if recorded is None:  # a new node db: adopt the shard files already here, if any
                found = (_SHARD_FILE.match(p.name) for p in db_dir.iterdir())
                on_disk = {int(m[2]) for m in found if m and not m[3] and not m[4]}
                if len(on_disk) > 1:
                    raise StorageError(f"{db_dir} holds shard files for {sorted(on_disk)} shards")
                recorded = on_disk.pop() if on_disk else shards
                sql = "INSERT INTO settings (key, value) VALUES ('shard_count', ?)"
                db.execute(sql, (str(recorded),))
        if recorded != shards:
            raise StorageError(
                f"data dir has {recorded} shards but node.toml says storage.shards = {shards}; "
                f"run 'rentahal-node db reshard --shards {shards}' to move the rows, "
                f"or set it back to {recorded}"
            )
    except BaseException:
        db.close()
        raise
    return db


class DurationWindow:
    """The last DURATIONS_KEPT durations of a realm, kept in arrival order and sorted, so that a
    percentile is a lookup: the dashboard asked every second once sorted them all per request."""

    def __init__(self) -> None:
        self.order: deque[float] = deque()
        self.sorted: list[float] = []

    def add(self, ms: float) -> None:
        self.order.append(ms)
        bisect.insort(self.sorted, ms)
        if len(self.order) > DURATIONS_KEPT:
            old = self.order.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, old)]

    def percentile(self, q: float) -> float:
        """Nearest rank."""
        return self.sorted[math.ceil(q * len(self.sorted)) - 1] if self.sorted else 0.0


# --- the storage ----------------------------------------------------------------------------


class Storage:
    def __init__(self, data_dir: Path, node: _File, shards: list[_File]) -> None:
        self.data_dir, self._node, self._shards, self._closed = data_dir, node, shards, False
        # realm -> [served_local, served_for_peers, failures, cancelled, ms, cost, [(ms, at)]]
        self._outcomes: dict[str, list[Any]] = {}
        self._counted = trio.Event()  # set once there is an outcome to store
        # realm -> the last DURATIONS_KEPT durations, in arrival order and sorted: p95 without a sort
        self._windows: dict[str, DurationWindow] | None = None

    @classmethod
    async def open(cls, data_dir: Path, shards: int) -> Storage:
        """Creates the files if needed, migrates them and checks the shard count."""
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        db_dir = Path(data_dir) / "db"
        node_db = await trio.to_thread.run_sync(_open_node, db_dir, shards)
        paths = [db_dir / shard_file(i, shards) for i in range(shards)]
        opened: list[Database | None] = [None] * shards

        async def open_shard(i: int) -> None:
            opened[i] = await trio.to_thread.run_sync(_open_file, paths[i], MIGRATIONS_SHARD)

        try:
            await _all(open_shard, shards)
        except BaseException:
            for db in [node_db, *opened]:
                if db is not None:
                    db.close()
            raise
        files = [_File(path, db) for path, db in zip(paths, opened, strict=True) if db]
        return cls(Path(data_dir), _File(db_dir / NODE_FILE, node_db), files)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):  # a cancelled close would leak the connections
            try:
                await self.flush_outcomes()
            except StorageFailure:
                pass
            for f in [*self._shards, self._node]:
                await f.run(lambda db: db.close())

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def _shard(self, guid: str) -> _File:
        return self._shards[shard_for(guid, len(self._shards))]

    async def _every_shard(self, fn: Callable[[Database], T]) -> list[T]:
        out: list[Any] = [None] * len(self._shards)

        async def one(i: int) -> None:
            out[i] = await self._shards[i].run(fn)

        await _all(one, len(self._shards))
        return out

    async def _on(self, guid: str | None, fn: Callable[[Database], T | None]) -> T | None:
        """`fn` on the user's shard, or on every shard (first hit) when the user is unknown."""
        if guid is not None:
            return await self._shard(guid).run(fn)
        return next((r for r in await self._every_shard(fn) if r is not None), None)

    # --- users -------------------------------------------------------------------------------

    async def ensure_user(self, guid: str, nickname: str | None = None) -> Row:
        def write(db: Database) -> Row:
            sql = "INSERT OR IGNORE INTO users (guid, nickname, created_at) VALUES (?, ?, ?)"
            db.execute(sql, (guid, nickname, time.time()))
            return _user(next(db.query("SELECT * FROM users WHERE guid = ?", (guid,))))

        return await self._shard(guid).write(write)

    async def get_user(self, guid: str) -> Row | None:
        sql = "SELECT * FROM users WHERE guid = ?"
        rows = await self._shard(guid).rows(sql, (guid,))
        return _user(rows[0]) if rows else None

    async def set_nickname(self, guid: str, nickname: str) -> None:
        """Sets the nickname, creating the user if needed."""
        await self._shard(guid).execute(
            "INSERT INTO users (guid, nickname, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (guid) DO UPDATE SET nickname = excluded.nickname",
            (guid, nickname, time.time()),
        )

    async def set_banned(self, guid: str, banned: bool, reason: str = "") -> bool:
        sql = "UPDATE users SET banned = ?, ban_reason = ? WHERE guid = ?"
        params = (int(banned), reason if banned else "", guid)
        return await self._shard(guid).execute(sql, params) > 0

    async def list_users(self, limit: int = 1000) -> list[Row]:
        """Newest first, across shards."""
        sql = "SELECT * FROM users ORDER BY created_at DESC, guid LIMIT ?"
        parts = await self._every_shard(lambda db: list(db.query(sql, (limit,))))
        rows = sorted((r for p in parts for r in p), key=lambda r: (-r["created_at"], r["guid"]))
        return [_user(r) for r in rows[:limit]]

    # --- queries -----------------------------------------------------------------------------

    async def insert_query(
        self,
        *,
        query_id: str,
        user_guid: str,
        realm: str,
        payload: dict[str, Any],
        priority: int,
        deadline_at: float,
        created_at: float | None = None,
    ) -> None:
        """Stores the query as `queued` with its first event (and the user row if missing)."""
        at = time.time() if created_at is None else created_at

        def write(db: Database) -> None:
            blob = _pack(payload)  # in the worker thread: payloads can be megabytes
            sql = "INSERT OR IGNORE INTO users (guid, created_at) VALUES (?, ?)"
            db.execute(sql, (user_guid, at))
            try:
                db.execute(
                    "INSERT INTO queries (id, user_guid, realm, payload, priority, status, "
                    "created_at, updated_at, deadline_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (query_id, user_guid, realm, blob, priority, "queued", at, at, deadline_at),
                )
            except sqlite3.IntegrityError as e:
                raise StorageError(f"cannot store query {query_id!r}: {e}") from e
            sql = "INSERT INTO query_events (query_id, status, at) VALUES (?, 'queued', ?)"
            db.execute(sql, (query_id, at))

        await self._shard(user_guid).write(write)

    async def set_status(
        self,
        query_id: str,
        user_guid: str,
        status: str,
        *,
        executor: str | None = None,
        detail: str = "",
        attempts: int | None = None,
        failovers: list[str] | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Updates the query (None keeps a column as it is) and logs the event; StorageError if
        there is no such query."""
        if status not in QUERY_STATUSES:
            raise ValueError(f"unknown query status {status!r}")
        now, fo = time.time(), None if failovers is None else json.dumps(failovers)
        qid, guid = query_id, user_guid

        def write(db: Database) -> None:
            cur = db.execute(
                "UPDATE queries SET status = ?, updated_at = ?, executor = coalesce(?, executor), "
                "attempts = coalesce(?, attempts), failovers = coalesce(?, failovers), "
                "error_code = coalesce(?, error_code), error_message = coalesce(?, error_message) "
                "WHERE id = ? AND user_guid = ?",
                (status, now, executor, attempts, fo, error_code, error_message, qid, guid),
            )
            if cur.rowcount == 0:
                raise StorageError(f"no query {query_id!r} for user {user_guid!r}")
            db.execute(
                "INSERT INTO query_events (query_id, status, at, executor, detail) VALUES (?, ?, ?, ?, ?)",
                (query_id, status, now, executor, detail),
            )

        await self._shard(user_guid).write(write)

    async def finish_query(
        self,
        query_id: str,
        user_guid: str,
        *,
        output: dict[str, Any],
        stats: dict[str, Any],
        executor: str,
        failovers: list[str],
        processing_ms: float,
        cost: float,
        attempts: int = 0,
        events: list[QueryEvent] = (),  # type: ignore[assignment]
    ) -> bool:
        """Stores the result and the status history since it was stored, marks the query done
        and adds to the user's totals, in one transaction. Returns False, changing nothing, if
        the query already has a result."""
        now = time.time()

        def write(db: Database) -> bool:
            try:
                cur = db.execute(
                    "INSERT OR IGNORE INTO results (query_id, output, stats, created_at) VALUES (?, ?, ?, ?)",
                    (query_id, _pack(output), json.dumps(stats), now),
                )
            except sqlite3.IntegrityError as e:  # the foreign key: no such query
                raise StorageError(f"cannot store a result for query {query_id!r}: {e}") from e
            if cur.rowcount == 0:
                return False
            cur = db.execute(
                "UPDATE queries SET status = 'done', updated_at = ?, executor = ?, failovers = ?, "
                "processing_ms = ?, cost = ?, attempts = max(attempts, ?), error_code = NULL, "
                "error_message = NULL WHERE id = ? AND user_guid = ?",
                (now, executor, json.dumps(failovers), processing_ms, cost, attempts, query_id, user_guid),
            )
            if cur.rowcount == 0:
                raise StorageError(f"no query {query_id!r} for user {user_guid!r}")
            _log_events(db, query_id, [*events, QueryEvent("done", now, executor)])
            db.execute(
                "UPDATE users SET queries = queries + 1, total_cost = total_cost + ?, "
                "total_ms = total_ms + ? WHERE guid = ?",
                (cost, processing_ms, user_guid),
            )
            return True

        return await self._shard(user_guid).write(write)

    async def end_query(
        self,
        query_id: str,
        user_guid: str,
        status: str,
        *,
        error_code: str,
        error_message: str,
        executor: str | None = None,
        attempts: int | None = None,
        failovers: list[str] | None = None,
        events: list[QueryEvent] = (),  # type: ignore[assignment]
    ) -> bool:
        """Marks an unfinished query failed or cancelled, with its status history, in one
        transaction; False (changing nothing) if it has finished already."""
        if status not in ("failed", "cancelled"):
            raise ValueError(f"not an end status: {status!r}")
        now, fo = time.time(), None if failovers is None else json.dumps(failovers)

        def write(db: Database) -> bool:
            cur = db.execute(
                "UPDATE queries SET status = ?, updated_at = ?, executor = coalesce(?, executor), "
                "attempts = coalesce(?, attempts), failovers = coalesce(?, failovers), "
                "error_code = ?, error_message = ? WHERE id = ? AND user_guid = ? AND status IN (?, ?, ?)",
                (status, now, executor, attempts, fo, error_code, error_message, query_id, user_guid, *UNFINISHED),
            )
            if cur.rowcount == 0:
                return False
            _log_events(db, query_id, [*events, QueryEvent(status, now, executor, error_message[:500])])
            return True

        return await self._shard(user_guid).write(write)

    async def get_query(self, query_id: str, user_guid: str | None = None) -> Row | None:
        def read(db: Database) -> Row | None:
            row = _one(db, "SELECT * FROM queries WHERE id = ?", (query_id,))
            return None if row is None else _query(row)

        return await self._on(user_guid, read)

    async def get_result(self, query_id: str, user_guid: str | None = None) -> Row | None:
        def read(db: Database) -> Row | None:
            row = _one(db, "SELECT * FROM results WHERE query_id = ?", (query_id,))
            if row is not None:
                row["output"], row["stats"] = _unpack(row["output"]), json.loads(row["stats"])
            return row

        return await self._on(user_guid, read)

    async def query_events(self, query_id: str, user_guid: str | None = None) -> list[Row]:
        sql = "SELECT * FROM query_events WHERE query_id = ? ORDER BY id"
        return await self._on(user_guid, lambda db: list(db.query(sql, (query_id,))) or None) or []

    async def unfinished_queries(self) -> list[Row]:
        """Every queued, routed or running query, across shards, by (priority, created_at)."""
        sql = "SELECT * FROM queries WHERE status IN (?, ?, ?)"
        parts = await self._every_shard(lambda db: [_query(r) for r in db.query(sql, UNFINISHED)])
        return sorted((r for p in parts for r in p), key=lambda r: (r["priority"], r["created_at"]))

    async def history(self, user_guid: str | None = None, limit: int = 50) -> list[Row]:
        """Newest first; each row is the query plus `result_text` (the result's output["text"])."""
        where, params = ("WHERE q.user_guid = ?", (user_guid, limit)) if user_guid is not None else ("", (limit,))
        sql = (
            f"SELECT q.*, r.output AS result_output FROM queries q LEFT JOIN results r "
            f"ON r.query_id = q.id {where} ORDER BY q.created_at DESC, q.id LIMIT ?"
        )

        def read(db: Database) -> list[Row]:
            rows = [_query(r) for r in db.query(sql, params)]
            for r in rows:
                out = _unpack(r.pop("result_output"))
                r["result_text"] = out.get("text") if isinstance(out, dict) else None
            return rows

        if user_guid is not None:
            return await self._shard(user_guid).run(read)
        parts = await self._every_shard(read)
        rows = sorted((r for p in parts for r in p), key=lambda r: (-r["created_at"], r["id"]))
        return rows[:limit]

    # --- node-wide ---------------------------------------------------------------------------

    async def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        sql = "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
        await self._node.execute(sql, (time.time(), actor, action, target, detail))

    async def audit_log(self, limit: int = 100) -> list[Row]:
        """Newest first."""
        return await self._node.rows("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))

    # --- API keys (only their SHA-256 is stored) ------------------------------------------------

    async def add_api_key(self, key_id: str, name: str, digest: str, user_guid: str) -> None:
        sql = "INSERT INTO api_keys (id, name, hash, user_guid, created_at) VALUES (?, ?, ?, ?, ?)"
        await self._node.execute(sql, (key_id, name, digest, user_guid, time.time()))

    async def api_key(self, digest: str) -> Row | None:
        rows = await self._node.rows("SELECT * FROM api_keys WHERE hash = ?", (digest,))
        return rows[0] if rows else None

    async def api_keys(self) -> list[Row]:
        return await self._node.rows(
            "SELECT id, name, user_guid, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )

    async def revoke_api_key(self, key_id: str) -> bool:
        """True if the key existed and was live."""
        sql = "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
        return await self._node.execute(sql, (time.time(), key_id)) > 0

    def record_outcome(
        self,
        realm: str,
        *,
        for_peer: bool,
        ok: bool,
        cancelled: bool = False,
        ms: float = 0.0,
        cost: float = 0.0,
    ) -> None:
        """Counts one outcome in memory (``flush_outcomes`` stores them). Time and cost are added
        (and feed p95) only for a served query."""
        served = ok and not cancelled
        c = self._outcomes.setdefault(realm, [0, 0, 0, 0, 0.0, 0.0, []])
        for i, yes in enumerate((served and not for_peer, served and for_peer, not ok and not cancelled, cancelled)):
            c[i] += int(yes)
        if served:
            c[4] += ms
            c[5] += cost
            c[6].append((ms, time.time()))
            if self._windows is not None:
                self._windows.setdefault(realm, DurationWindow()).add(ms)
        self._counted.set()

    async def outcomes_counted(self) -> None:
        """Returns once there are counted outcomes to store (at once if there are)."""
        while not self._outcomes:
            await self._counted.wait()

    async def flush_outcomes(self) -> None:
        """Store the counted outcomes in one transaction; kept for the next try if it fails."""
        if not self._outcomes:
            return
        outcomes, self._outcomes = self._outcomes, {}
        self._counted = trio.Event()

        def write(db: Database) -> None:
            for realm, (local, peers, failures, cancelled, ms, cost, durations) in outcomes.items():
                db.execute(
                    "INSERT INTO realm_stats (realm, served_local, served_for_peers, failures, "
                    "cancelled, total_ms, total_cost) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (realm) DO UPDATE SET "
                    "served_local = served_local + excluded.served_local, "
                    "served_for_peers = served_for_peers + excluded.served_for_peers, "
                    "failures = failures + excluded.failures, "
                    "cancelled = cancelled + excluded.cancelled, "
                    "total_ms = total_ms + excluded.total_ms, "
                    "total_cost = total_cost + excluded.total_cost",
                    (realm, local, peers, failures, cancelled, ms, cost),
                )
                if durations:
                    db.conn.executemany(
                        "INSERT INTO durations (realm, ms, at) VALUES (?, ?, ?)",
                        [(realm, d, at) for d, at in durations[-DURATIONS_KEPT:]],
                    )
                    db.execute(
                        "DELETE FROM durations WHERE realm = ? AND id <= (SELECT id FROM durations "
                        "WHERE realm = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (realm, realm, DURATIONS_KEPT),
                    )

        try:
            await self._node.write(write)
        except StorageFailure:
            for realm, c in outcomes.items():  # put back what could not be stored
                mine = self._outcomes.setdefault(realm, [0, 0, 0, 0, 0.0, 0.0, []])
                for i in range(6):
                    mine[i] += c[i]
                mine[6][:0] = c[6][-DURATIONS_KEPT:]
            self._counted.set()
            raise

    async def stats(self) -> dict[str, Row]:
        """Per realm: served_local, served_for_peers, failures, cancelled, avg_ms, p95_ms
        (nearest rank, over the last DURATIONS_KEPT served queries) and total_cost."""

        if self._windows is None:  # once: the stored durations, oldest first; then kept in memory

            def load(db: Database) -> dict[str, DurationWindow]:
                windows: dict[str, DurationWindow] = {}
                for realm, ms in db.execute("SELECT realm, ms FROM durations ORDER BY id"):
                    windows.setdefault(realm, DurationWindow()).add(ms)
                return windows

            await self.flush_outcomes()
            self._windows = {}  # what is served while the stored ones load goes here meanwhile
            loaded = await self._node.run(load)
            for realm, meanwhile in self._windows.items():
                for ms in meanwhile.order:
                    loaded.setdefault(realm, DurationWindow()).add(ms)
            self._windows = loaded

        def read(db: Database) -> dict[str, Row]:
            out = {}
            for row in db.query("SELECT * FROM realm_stats ORDER BY realm"):
                served = row["served_local"] + row["served_for_peers"]
                total_ms, realm = row.pop("total_ms"), row.pop("realm")
                window = windows.get(realm)
                out[realm] = {
                    **row,
                    "avg_ms": total_ms / served if served else 0.0,
                    "p95_ms": window.percentile(0.95) if window else 0.0,
                }
            return out

        windows = self._windows
        await self.flush_outcomes()
        return await self._node.run(read)

    async def set_peer_blocked(self, peer_id: str, blocked: bool) -> None:
        await self._node.execute(
            "INSERT INTO peers (peer_id, first_seen, blocked) VALUES (?, ?, ?) "
            "ON CONFLICT (peer_id) DO UPDATE SET blocked = excluded.blocked",
            (peer_id, time.time(), int(blocked)),
        )

    async def blocked_peers(self) -> set[str]:
        return {r["peer_id"] for r in await self._node.rows("SELECT peer_id FROM peers WHERE blocked")}

    async def note_peer(self, peer_id: str, addrs: list[str]) -> None:
        """Records the peer's addresses and that it was seen now."""
        now = time.time()
        await self._node.execute(
            "INSERT INTO peers (peer_id, addrs, first_seen, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (peer_id) DO UPDATE SET addrs = excluded.addrs, "
            "last_seen = excluded.last_seen",
            (peer_id, json.dumps(addrs), now, now),
        )

    async def known_peers(self, *, max_age: float, limit: int) -> dict[str, list[str]]:
        """Peers seen within ``max_age`` seconds that are not blocked, newest first, with the
        addresses this node reached them on: a restarted node rejoins through them."""
        rows = await self._node.rows(
            "SELECT peer_id, addrs FROM peers WHERE NOT blocked AND last_seen > ? ORDER BY last_seen DESC LIMIT ?",
            (time.time() - max_age, limit),
        )
        out: dict[str, list[str]] = {}
        for r in rows:
            try:
                addrs = json.loads(r["addrs"])
            except ValueError:
                continue
            if isinstance(addrs, list):
                out[r["peer_id"]] = [a for a in addrs if isinstance(a, str)][:8]
        return out

    async def set_realm_enabled(self, realm: str, enabled: bool) -> None:
        await self._node.execute(
            "INSERT INTO realm_settings (realm, enabled) VALUES (?, ?) "
            "ON CONFLICT (realm) DO UPDATE SET enabled = excluded.enabled",
            (realm, int(enabled)),
        )

    async def realm_overrides(self) -> dict[str, bool]:
        rows = await self._node.rows("SELECT realm, enabled FROM realm_settings")
        return {r["realm"]: bool(r["enabled"]) for r in rows}

    async def get_setting(self, key: str) -> str | None:
        rows = await self._node.rows("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    async def set_setting(self, key: str, value: str) -> None:
        await self._node.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


# --- offline tools (sync; the CLI runs them with the node stopped) ----------------------------

# Each shard table, selected with the GUID that routes its rows as the last column. Events get
# new ids (two old shards' ids would collide) in their old order; a query's rows stay together.
_COPY = (
    ("users", "SELECT *, guid FROM users"),
    ("queries", "SELECT *, user_guid FROM queries"),
    (
        "query_events",
        (
            "SELECT e.query_id, e.status, e.at, e.executor, e.detail, coalesce(q.user_guid, "
            "e.query_id) FROM query_events e LEFT JOIN queries q ON q.id = e.query_id ORDER BY e.id"
        ),
    ),
    (
        "results",
        ("SELECT r.*, coalesce(q.user_guid, r.query_id) FROM results r LEFT JOIN queries q ON q.id = r.query_id"),
    ),
)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_debris(db_dir: Path, current: int) -> None:
    """Deletes shard files not of the current layout: an interrupted reshard's temp files, or
    the old files of one that finished before it could delete them."""
    for p in db_dir.iterdir():
        if (m := _SHARD_FILE.match(p.name)) and (m[3] or int(m[2]) != current):
            p.unlink()


def _copy_rows(olds: list[Database], news: list[Database]) -> int:
    moved = 0
    for old in olds:
        for table, sql in _COPY:
            cur = old.conn.execute(sql)
            cols = [d[0] for d in cur.description][:-1]
            insert = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            while batch := cur.fetchmany(2000):
                parts: dict[int, list[tuple[Any, ...]]] = {}
                for row in batch:
                    parts.setdefault(shard_for(row[-1], len(news)), []).append(row[:-1])
                for i, rows in parts.items():
                    news[i].conn.executemany(insert, rows)
                moved += len(batch)
    for table, _ in _COPY:
        before, after = (sum(db[table].count for db in dbs) for dbs in (olds, news))
        if before != after:
            raise StorageError(f"reshard copied {after} of {before} {table} rows; aborted")
    return moved


def reshard(data_dir: Path, new_count: int) -> tuple[int, int]:
    """Moves every row of every shard table to its shard under `new_count` shards; returns
    (old count, rows copied). The new files are built under temp names, fsynced and renamed;
    the commit point is the `shard_count` update in the node db. Interrupted before that, the
    old layout is intact (and the next run clears the debris)."""
    if new_count < 1:
        raise ValueError(f"shard count must be at least 1, not {new_count}")
    db_dir = Path(data_dir) / "db"
    if not (db_dir / NODE_FILE).exists():
        raise StorageError(f"no {NODE_FILE} in {db_dir}: nothing to reshard")
    node = _open_file(db_dir / NODE_FILE, MIGRATIONS_NODE)
    olds: list[Database] = []
    news: list[Database] = []
    try:
        old_count = _recorded_shards(node)
        if old_count is None:
            raise StorageError(f"{NODE_FILE} records no shard count: nothing to reshard")
        _remove_debris(db_dir, old_count)
        if old_count == new_count:
            return old_count, 0
        paths = [db_dir / shard_file(i, old_count) for i in range(old_count)]
        if missing := [p.name for p in paths if not p.exists()]:
            raise StorageError(f"shard files missing: {', '.join(missing)}; reshard aborted")
        olds = [_open_file(p, MIGRATIONS_SHARD) for p in paths]
        tmp = [db_dir / f"{shard_file(i, new_count)}.tmp" for i in range(new_count)]
        for path in tmp:
            news.append(Database(sqlite3.connect(path, isolation_level=None), execute_plugins=False))
            news[-1].execute("PRAGMA synchronous = OFF")  # fsynced once, before the swap
            _migrate(news[-1], MIGRATIONS_SHARD, path.name)
            news[-1].execute("BEGIN")
        moved = _copy_rows(olds, news)
        for db in news:
            db.execute("COMMIT")
            db.close()
        news = []
        for i, path in enumerate(tmp):
            _fsync(path)
            os.replace(path, db_dir / shard_file(i, new_count))
        _fsync(db_dir)
        node.execute("PRAGMA synchronous = FULL")  # the commit point must survive a power cut
        node.execute("UPDATE settings SET value = ? WHERE key = 'shard_count'", (str(new_count),))
        for db in olds:
            db.close()
        olds = []
        _remove_debris(db_dir, new_count)
        return old_count, moved
    finally:
        for db in [*news, *olds, node]:
            db.close()


def check(data_dir: Path) -> list[tuple[str, str]]:
    """(file name, "ok" or what is wrong) for the node db, each shard db of the recorded layout,
    and any other shard file lying in the db folder."""
    db_dir = Path(data_dir) / "db"
    try:
        node = sqlite3.connect(f"{(db_dir / NODE_FILE).as_uri()}?mode=rw", uri=True)
        try:
            count = _recorded_shards(Database(node, execute_plugins=False))
        finally:
            node.close()
    except sqlite3.Error:
        count = None
    expected = [] if count is None else [shard_file(i, count) for i in range(count)]
    stray = sorted(p.name for p in db_dir.glob("shard-*.sqlite") if p.name not in expected)
    names = [NODE_FILE, *expected, *stray]
    return [(name, _check_file(db_dir / name, name in stray)) for name in names]


def _check_file(path: Path, stray: bool) -> str:
    if not path.exists():
        return "missing"
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True)
        try:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if problems == ["ok"]:
                problems = [
                    f"foreign key: {table} row {rowid} refers to a missing {parent} row"
                    for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check")
                ]
        finally:
            conn.close()
    except sqlite3.Error as e:
        problems = [str(e)]
    if stray and not problems:
        problems = ["not part of the recorded shard layout (left over from a reshard?)"]
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more if problems else "ok"
