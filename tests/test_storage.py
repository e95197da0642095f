"""Storage on real SQLite files: sharding, concurrency (tasks and processes), the event loop,
exactly-once results, resharding, integrity checks, migrations and the node-wide tables."""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from rentahal.node import storage as storage_mod
from rentahal.node.storage import (
    MIGRATIONS_NODE,
    MIGRATIONS_SHARD,
    NODE_FILE,
    Storage,
    StorageError,
    check,
    reshard,
    shard_file,
    shard_for,
)

DEADLINE = 4_000_000_000.0
ROOT = Path(__file__).resolve().parent.parent


async def write_queries(st: Storage, writer: str, n: int, users: int = 5) -> None:
    """`n` queries for this writer's own users; every other one finished."""
    for k in range(n):
        qid, guid = f"q-{writer}-{k}", f"u-{writer}-{k % users}"
        await st.insert_query(
            query_id=qid,
            user_guid=guid,
            realm="chat",
            payload={"prompt": f"p{k}", "n": k},
            priority=k % 3,
            deadline_at=DEADLINE,
        )
        if k % 2 == 0:
            assert await st.finish_query(
                qid,
                guid,
                output={"text": f"answer {k}"},
                stats={"tokens": k},
                executor="local",
                failovers=[],
                processing_ms=10.0,
                cost=0.5,
            )


def shard_rows(data_dir: Path, n: int, sql: str) -> list[list[tuple]]:
    out = []
    for i in range(n):
        conn = sqlite3.connect(data_dir / "db" / shard_file(i, n))
        try:
            out.append(conn.execute(sql).fetchall())
        finally:
            conn.close()
    return out


async def test_concurrent_writers_land_in_their_shards(tmp_path: Path) -> None:
    st = await Storage.open(tmp_path, 4)
    async with trio.open_nursery() as nursery:
        for w in range(8):
            nursery.start_soon(write_queries, st, str(w), 200)
    assert (await st.get_user("u-3-1"))["queries"] == 20
    await st.aclose()

    per_shard = shard_rows(tmp_path, 4, "SELECT user_guid, status FROM queries")
    assert sum(len(rows) for rows in per_shard) == 1600
    assert all(per_shard), "every shard gets some users"
    for i, rows in enumerate(per_shard):
        assert {shard_for(guid, 4) for guid, _ in rows} == {i}
    statuses = [s for rows in per_shard for _, s in rows]
    assert statuses.count("done") == 800 and statuses.count("queued") == 800
    results = shard_rows(tmp_path, 4, "SELECT count(*) FROM results")
    assert sum(r[0][0] for r in results) == 800
    users = shard_rows(tmp_path, 4, "SELECT guid, queries, total_cost FROM users")
    assert sorted((g, q, c) for rows in users for g, q, c in rows) == sorted(
        (f"u-{w}-{u}", 20, 10.0) for w in range(8) for u in range(5)
    )


CHILD = """
import sys, trio
from pathlib import Path
from tests.test_storage import write_queries
from rentahal.node.storage import Storage

async def main(data_dir, tag):
    print("started", flush=True)
    sys.stdin.readline()
    st = await Storage.open(Path(data_dir), 4)
    print("ready", flush=True)
    sys.stdin.readline()
    await write_queries(st, tag, 300)
    await st.aclose()

trio.run(main, *sys.argv[1:])
"""


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            return buf  # the child exited early: the caller shows its stderr
        buf += chunk
    return buf


async def test_other_processes_open_and_write_the_same_files(tmp_path: Path) -> None:
    """Three processes create one fresh data dir at the same moment, then all write to it."""
    tags = ("child-a", "child-b")
    children = []
    with trio.fail_after(60):
        for tag in tags:
            with open(tmp_path / f"{tag}.err", "wb") as err:
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", CHILD, str(tmp_path), tag],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
            children.append(proc)

        async def step(expect: bytes) -> None:
            for tag, proc in zip(tags, children, strict=True):
                line = await read_line(proc.stdout)
                assert line == expect, (tmp_path / f"{tag}.err").read_text()
            for proc in children:
                await proc.stdin.send_all(b"go\n")

        await step(b"started\n")  # the children open the files now, as this process does
        st = await Storage.open(tmp_path, 4)
        await step(b"ready\n")  # ...and write, as this process does
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_queries, st, "parent", 300)
            for proc in children:
                nursery.start_soon(proc.wait)
    for tag, proc in zip(tags, children, strict=True):
        assert proc.returncode == 0, (tmp_path / f"{tag}.err").read_text()
    for tag in ("parent", *tags):
        for k in (0, 1, 299):
            q = await st.get_query(f"q-{tag}-{k}")
            assert q is not None and q["status"] == ("done" if k % 2 == 0 else "queued")
    assert len(await st.unfinished_queries()) == 3 * 150
    await st.aclose()
    assert sum(r[0][0] for r in shard_rows(tmp_path, 4, "SELECT count(*) FROM queries")) == 900


async def test_big_writes_do_not_block_the_event_loop(tmp_path: Path) -> None:
    st = await Storage.open(tmp_path, 1)
    blob = os.urandom(1 << 20) * 16  # 16 MiB, the default storage.max_payload_bytes
    ticks: list[float] = []

    async def ticker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(0.01)
            ticks.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        start, k = trio.current_time(), 0
        while trio.current_time() - start < 0.5 or k < 2:
            await st.insert_query(
                query_id=f"big-{k}",
                user_guid="u",
                realm="imagine",
                payload={"image": blob},
                priority=0,
                deadline_at=DEADLINE,
            )
            await st.finish_query(
                f"big-{k}",
                "u",
                output={"image": blob},
                stats={},
                executor="local",
                failovers=[],
                processing_ms=1.0,
                cost=0.0,
            )
            k += 1
        end = trio.current_time()
        nursery.cancel_scope.cancel()
    times = [start, *(t for t in ticks if t <= end), end]
    max_gap = max(b - a for a, b in itertools.pairwise(times))
    assert max_gap < 0.5, f"event loop stalled {max_gap:.3f}s while writing {k} x 2 x 16 MiB"
    assert len(times) > (end - start) / 0.01 / 4, f"{len(times)} ticks in {end - start:.2f}s"
    assert (await st.get_result("big-0", "u"))["output"]["image"] == blob
    await st.aclose()


async def test_finish_twice_stores_one_result_and_counts_once(tmp_path: Path) -> None:
    st = await Storage.open(tmp_path, 4)
    await st.insert_query(
        query_id="q1",
        user_guid="alice",
        realm="chat",
        payload={"prompt": "hi"},
        priority=1,
        deadline_at=DEADLINE,
    )
    kw = {
        "stats": {"tokens": 3},
        "executor": "peerA",
        "failovers": ["peerB"],
        "processing_ms": 120.0,
    }
    assert await st.finish_query("q1", "alice", output={"text": "one"}, cost=2.5, **kw)
    assert not await st.finish_query("q1", "alice", output={"text": "two"}, cost=9.0, **kw)
    assert (await st.get_result("q1"))["output"] == {"text": "one"}
    user = await st.get_user("alice")
    assert (user["queries"], user["total_cost"], user["total_ms"]) == (1, 2.5, 120.0)
    q = await st.get_query("q1", "alice")
    assert (q["status"], q["executor"], q["failovers"], q["cost"]) == (
        "done",
        "peerA",
        ["peerB"],
        2.5,
    )
    assert [e["status"] for e in await st.query_events("q1")] == ["queued", "done"]
    with pytest.raises(StorageError):
        await st.finish_query("nope", "alice", output={}, cost=0.0, **kw)
    with pytest.raises(StorageError):
        await st.insert_query(
            query_id="q1",
            user_guid="alice",
            realm="chat",
            payload={},
            priority=1,
            deadline_at=DEADLINE,
        )
    await st.aclose()


async def snapshot(st: Storage, qids: list[str]) -> dict:
    out = {"users": await st.list_users(), "unfinished": await st.unfinished_queries()}
    for qid in qids:
        events = [{k: v for k, v in e.items() if k != "id"} for e in await st.query_events(qid)]
        out[qid] = (await st.get_query(qid), await st.get_result(qid), events)
    return out


async def test_reshard_keeps_every_row_and_check_finds_corruption(tmp_path: Path) -> None:
    st = await Storage.open(tmp_path, 4)
    async with trio.open_nursery() as nursery:
        for w in range(4):
            nursery.start_soon(write_queries, st, str(w), 60, 7)
    await st.set_status("q-0-1", "u-0-1", "running", executor="peerX", attempts=2)
    await st.set_status("q-0-3", "u-0-3", "failed", error_code="hang", error_message="timeout")
    await st.set_banned("u-1-2", True, "spam")
    qids = [f"q-{w}-{k}" for w in range(4) for k in range(60)]
    before = await snapshot(st, qids)
    await st.aclose()

    with pytest.raises(StorageError) as err:
        await Storage.open(tmp_path, 8)
    assert str(err.value) == (
        "data dir has 4 shards but node.toml says storage.shards = 8; run 'rentahal-node db "
        "reshard --shards 8' to move the rows, or set it back to 4"
    )
    rows = 28 + 240 + 240 + 2 + 120 + 120  # users, queries, events, results
    assert reshard(tmp_path, 7) == (4, rows)
    st = await Storage.open(tmp_path, 7)
    assert await snapshot(st, qids) == before
    await st.aclose()
    assert reshard(tmp_path, 2) == (7, rows)
    st = await Storage.open(tmp_path, 2)
    assert st.shard_count == 2 and await st.get_setting("shard_count") == "2"
    assert await snapshot(st, qids) == before
    await st.aclose()
    for i, guids in enumerate(shard_rows(tmp_path, 2, "SELECT guid FROM users")):
        assert {shard_for(g, 2) for (g,) in guids} == {i}
    names = sorted(p.name for p in (tmp_path / "db").iterdir())
    assert names == [NODE_FILE, shard_file(0, 2), shard_file(1, 2)]
    assert check(tmp_path) == [(n, "ok") for n in (NODE_FILE, shard_file(0, 2), shard_file(1, 2))]

    victim = tmp_path / "db" / shard_file(1, 2)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(size // 3))
    report = dict(check(tmp_path))
    assert report[NODE_FILE] == report[shard_file(0, 2)] == "ok"
    assert report[shard_file(1, 2)] != "ok"


async def test_interrupted_reshard_leaves_the_old_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = await Storage.open(tmp_path, 2)
    await write_queries(st, "w", 20)
    qids = [f"q-w-{k}" for k in range(20)]
    before = await snapshot(st, qids)
    await st.aclose()

    fsync = storage_mod._fsync

    def power_cut_after_the_renames(path: Path) -> None:
        if path.is_dir():  # the last step before the new count is recorded
            raise OSError("power cut")
        fsync(path)

    monkeypatch.setattr(storage_mod, "_fsync", power_cut_after_the_renames)
    with pytest.raises(OSError, match="power cut"):
        reshard(tmp_path, 3)
    monkeypatch.undo()
    assert (tmp_path / "db" / shard_file(2, 3)).exists()
    with pytest.raises(StorageError, match="data dir has 2 shards"):
        await Storage.open(tmp_path, 3)
    st = await Storage.open(tmp_path, 2)
    assert await snapshot(st, qids) == before
    await st.aclose()
    report = check(tmp_path)
    assert report[:3] == [(n, "ok") for n in (NODE_FILE, shard_file(0, 2), shard_file(1, 2))]
    assert [(n, "reshard?" in r) for n, r in report[3:]] == [(shard_file(i, 3), True) for i in range(3)]

    assert reshard(tmp_path, 3) == (2, 5 + 20 + 30 + 10)  # users, queries, events, results
    st = await Storage.open(tmp_path, 3)
    assert await snapshot(st, qids) == before
    await st.aclose()
    assert check(tmp_path) == [(n, "ok") for n in [NODE_FILE, *map(shard_file, range(3), [3] * 3)]]


async def test_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = await Storage.open(tmp_path, 2)
    await st.ensure_user("alice")
    await st.aclose()
    db_dir = tmp_path / "db"

    def version(name: str) -> int:
        conn = sqlite3.connect(db_dir / name)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()

    assert version(NODE_FILE) == len(MIGRATIONS_NODE)
    assert version(shard_file(0, 2)) == version(shard_file(1, 2)) == len(MIGRATIONS_SHARD)

    extra = "ALTER TABLE users ADD COLUMN avatar TEXT NOT NULL DEFAULT 'none'"
    monkeypatch.setattr(storage_mod, "MIGRATIONS_SHARD", [*MIGRATIONS_SHARD, extra])
    st = await Storage.open(tmp_path, 2)
    assert (await st.get_user("alice"))["avatar"] == "none"
    await st.aclose()
    assert version(shard_file(0, 2)) == len(MIGRATIONS_SHARD) + 1
    monkeypatch.undo()
    with pytest.raises(StorageError, match="written by a newer rentahal-node"):
        await Storage.open(tmp_path, 2)

    conn = sqlite3.connect(db_dir / NODE_FILE)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match=re.escape("node.sqlite has schema version 99")):
        await Storage.open(tmp_path, 2)


async def test_queries_users_and_history(tmp_path: Path) -> None:
    st = await Storage.open(tmp_path, 4)
    specs = [
        ("a", "alice", 1, 10.0),
        ("b", "bob", 0, 30.0),
        ("c", "alice", 0, 20.0),
        ("d", "carol", 1, 5.0),
        ("e", "bob", 2, 1.0),
    ]
    for qid, guid, prio, created in specs:
        await st.insert_query(
            query_id=qid,
            user_guid=guid,
            realm="chat",
            payload={"prompt": qid},
            priority=prio,
            deadline_at=DEADLINE,
            created_at=created,
        )
    await st.set_status("b", "bob", "routed", executor="peerA", detail="score 80")
    await st.set_status("d", "carol", "cancelled", detail="by user")
    await st.finish_query(
        "e",
        "bob",
        output={"text": "E!"},
        stats={},
        executor="local",
        failovers=[],
        processing_ms=5.0,
        cost=1.0,
    )
    assert [q["id"] for q in await st.unfinished_queries()] == ["c", "b", "a"]
    assert [(q["id"], q["result_text"]) for q in await st.history("bob")] == [
        ("b", None),
        ("e", "E!"),
    ]
    assert [q["id"] for q in await st.history()] == ["b", "c", "a", "d", "e"]
    assert [q["id"] for q in await st.history(limit=2)] == ["b", "c"]
    q = await st.get_query("b")
    assert (q["user_guid"], q["status"], q["executor"], q["payload"]) == (
        "bob",
        "routed",
        "peerA",
        {"prompt": "b"},
    )
    assert await st.get_query("missing") is None and await st.get_result("b") is None
    events = await st.query_events("b", "bob")
    assert [(e["status"], e["detail"]) for e in events] == [("queued", ""), ("routed", "score 80")]
    with pytest.raises(StorageError):
        await st.set_status("b", "alice", "running")
    with pytest.raises(ValueError):
        await st.set_status("b", "bob", "exploded")

    hostile = "x'); DROP TABLE users; --"
    user = await st.ensure_user(hostile, nickname=hostile)
    assert (user["guid"], user["nickname"], user["banned"]) == (hostile, hostile, False)
    assert (await st.ensure_user(hostile, nickname="other"))["nickname"] == hostile
    await st.set_nickname(hostile, "Robert")
    assert await st.set_banned(hostile, True, "tables")
    assert not await st.set_banned("nobody", True)
    user = await st.get_user(hostile)
    assert (user["nickname"], user["banned"], user["ban_reason"]) == ("Robert", True, "tables")
    assert await st.get_user("nobody") is None
    users = await st.list_users()
    assert users[0]["guid"] == hostile and {u["guid"] for u in users} == {
        "alice",
        "bob",
        "carol",
        hostile,
    }
    assert len(await st.list_users(limit=2)) == 2
    await st.aclose()


async def test_node_wide_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st = await Storage.open(tmp_path, 1)
    for ms in range(1, 101):
        st.record_outcome("chat", for_peer=ms % 4 == 0, ok=True, ms=float(ms), cost=0.5)
    st.record_outcome("chat", for_peer=False, ok=False, ms=9999.0, cost=7.0)
    st.record_outcome("chat", for_peer=True, ok=False, cancelled=True, ms=9999.0)
    st.record_outcome("vision", for_peer=True, ok=False)
    stats = await st.stats()
    assert stats["chat"] == {
        "served_local": 75,
        "served_for_peers": 25,
        "failures": 1,
        "cancelled": 1,
        "avg_ms": 50.5,
        "p95_ms": 95.0,
        "total_cost": 50.0,
    }
    assert stats["vision"]["failures"] == 1 and stats["vision"]["p95_ms"] == 0.0

    monkeypatch.setattr(storage_mod, "DURATIONS_KEPT", 10)
    for _ in range(3):
        st.record_outcome("speech", for_peer=False, ok=True, ms=1000.0)
    for _ in range(10):
        st.record_outcome("speech", for_peer=False, ok=True, ms=1.0)
    assert (await st.stats())["speech"]["p95_ms"] == 1.0  # the slow ones aged out

    for i in range(5):
        await st.audit("sysop", "ban", f"user-{i}", detail="why")
    log = await st.audit_log(limit=3)
    assert [e["target"] for e in log] == ["user-4", "user-3", "user-2"]
    assert (log[0]["actor"], log[0]["action"], log[0]["detail"]) == ("sysop", "ban", "why")

    await st.note_peer("peerA", ["/ip4/1.2.3.4/tcp/1"])
    await st.set_peer_blocked("peerA", True)
    await st.set_peer_blocked("peerB", True)
    await st.set_peer_blocked("peerB", False)
    await st.set_peer_blocked("peerC", True)
    await st.note_peer("peerC", ["/ip4/5.6.7.8/tcp/2"])
    assert await st.blocked_peers() == {"peerA", "peerC"}

    await st.set_realm_enabled("chat", False)
    await st.set_realm_enabled("vision", True)
    await st.set_realm_enabled("chat", True)
    assert await st.realm_overrides() == {"chat": True, "vision": True}
    assert await st.get_setting("motd") is None
    await st.set_setting("motd", "hi")
    await st.set_setting("motd", "hello")
    assert await st.get_setting("motd") == "hello"
    await st.aclose()


def test_shard_for_is_stable() -> None:
    # sha256("alice") starts 2bd806c97f0e00af: that as a big-endian int, mod n.
    assert [shard_for("alice", n) for n in (1, 2, 4, 7, 8, 64)] == [0, 1, 3, 1, 7, 47]
    assert [shard_for("bob", n) for n in (4, 7, 64)] == [2, 1, 26]
    assert shard_for("ünïcode-✓", 64) == 62
    assert int("2bd806c97f0e00af", 16) % 7 == shard_for("alice", 7)


# --- group commit, the two writes of a query, a full disk ----------------------------------------


async def test_concurrent_writes_share_transactions_and_a_failing_one_undoes_only_itself(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batches: list[int] = []
    commit = storage_mod._commit

    def counting(db: Any, batch: list[Any]) -> None:
        batches.append(len(batch))
        commit(db, batch)

    monkeypatch.setattr(storage_mod, "_commit", counting)
    st = await Storage.open(tmp_path, 1)
    try:
        errors: list[Exception] = []

        async def one(i: int) -> None:
            try:
                await st.insert_query(
                    query_id="dup" if i % 10 == 9 else f"q{i}",
                    user_guid="u",
                    realm="chat",
                    payload={"i": i},
                    priority=10,
                    deadline_at=1e12,
                )
            except StorageError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        stored = {r["id"] for r in await st.unfinished_queries()}
    finally:
        await st.aclose()
    assert sum(batches) == 100 and len(batches) < 50  # grouped, not one transaction each
    assert len(errors) == 9  # the duplicate ids: refused one by one, nothing else undone
    assert stored == {f"q{i}" for i in range(100) if i % 10 != 9} | {"dup"}


async def test_a_query_is_two_write_transactions_with_its_history(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rentahal.node.storage import QueryEvent

    st = await Storage.open(tmp_path, 2)
    try:
        batches: list[int] = []
        commit = storage_mod._commit
        monkeypatch.setattr(storage_mod, "_commit", lambda db, b: (batches.append(len(b)), commit(db, b))[1])
        await st.insert_query(query_id="q1", user_guid="u", realm="chat", payload={}, priority=10, deadline_at=1e12)
        history = [
            QueryEvent("routed", 1.0, "peerA"),
            QueryEvent("running", 2.0, "peerA"),
            QueryEvent("routed", 3.0, "local", "failover: dead: stream lost"),
        ]
        assert await st.finish_query(
            "q1",
            "u",
            output={"text": "x"},
            stats={},
            executor="local",
            failovers=["peerA"],
            processing_ms=5.0,
            cost=0.0,
            attempts=2,
            events=history,
        )
        assert batches == [1, 1]
        events = await st.query_events("q1", "u")
        row = await st.get_query("q1", "u")
    finally:
        await st.aclose()
    assert [e["status"] for e in events] == ["queued", "routed", "running", "routed", "done"]
    assert events[3]["detail"] == "failover: dead: stream lost"
    assert (row["status"], row["attempts"], row["failovers"]) == ("done", 2, ["peerA"])


async def test_a_full_disk_is_storage_full_and_nothing_is_half_written(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full", made by capping the file's page count."""
    from rentahal.realms.events import StorageFull

    st = await Storage.open(tmp_path, 1)
    try:
        await st.insert_query(query_id="q1", user_guid="u", realm="chat", payload={}, priority=10, deadline_at=1e12)
        shard = st._shards[0]
        pages = await shard.run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await shard.run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        with pytest.raises(StorageFull) as info:
            await st.finish_query(
                "q1",
                "u",
                output={"text": "x" * 200_000},
                stats={},
                executor="local",
                failovers=[],
                processing_ms=1.0,
                cost=0.0,
            )
        assert info.value.code.value == "storage_full" and "full" in info.value.message
        assert (await st.get_query("q1", "u"))["status"] == "queued"  # the query is still there
        await shard.run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))  # space is back
        assert await st.finish_query(
            "q1",
            "u",
            output={"text": "x" * 200_000},
            stats={},
            executor="local",
            failovers=[],
            processing_ms=1.0,
            cost=0.0,
        )
        assert (await st.get_result("q1", "u"))["output"] == {"text": "x" * 200_000}
    finally:
        await st.aclose()


async def test_realm_counters_survive_a_failed_flush(tmp_path: Path) -> None:
    from rentahal.realms.events import StorageFailure

    st = await Storage.open(tmp_path, 1)
    try:
        st.record_outcome("chat", for_peer=False, ok=True, ms=10.0, cost=1.0)
        pages = await st._node.run(lambda db: db.execute("PRAGMA page_count").fetchone()[0])
        await st._node.run(lambda db: db.execute(f"PRAGMA max_page_count = {pages}"))
        for i in range(300):  # enough to need a new page
            st.record_outcome(f"realm{i}", for_peer=False, ok=True, ms=1.0)
        with pytest.raises(StorageFailure):
            await st.flush_outcomes()
        await st._node.run(lambda db: db.execute("PRAGMA max_page_count = 1073741823"))
        stats = await st.stats()
    finally:
        await st.aclose()
    assert stats["chat"]["served_local"] == 1 and stats["chat"]["total_cost"] == 1.0
    assert len(stats) == 301
