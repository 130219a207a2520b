"""Store: layout, durability on open, session ids, deletion, corruption, fsck, re-gisting."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import threading
import time

import numpy as np
import pytest

from megacontext_memory.operations.crashtest import (
    TINY_MODEL,
    message,
    open_tree,
    rebuild,
    scan_for,
    tiny_gister,
)
from megacontext_memory.operations.transfer import (
    export_main,
    export_sessions,
    read_export,
    reindex,
)
from megacontext_memory.store import GistVersionMismatch, PayloadError, Store, StoreError
from megacontext_memory.store.fsck import NEEDS_REGIST, fsck, fsck_main
from megacontext_memory.store.payload import HEADER_SIZE, MAGIC
from megacontext_memory.store.sqlite import session_key


@pytest.fixture(scope="module")
def gister():
    return tiny_gister()


def fill(tree, seed: int, n: int, start: int = 0):
    for i in range(start, start + n):
        role, content, meta = message(seed, i)
        tree.append(role, content, meta, tree.gister.base.encode(content))
        tree.make_gists()  # as after each turn: gists follow the append


def assert_matches_rebuild(tree, gister):
    tokens = tree.store.tokens()
    counts = tree.store.counts()
    want = rebuild(gister, tokens)
    assert set(counts) - {0} == set(want)
    for level, arr in want.items():
        got = tree.store.gists(level, 0, counts[level]).astype(np.float32)
        np.testing.assert_allclose(got, arr.astype(np.float32), atol=2e-3)


@pytest.fixture
def filled(tmp_path, gister):
    tree = open_tree(tmp_path / "st", "sess", gister)
    fill(tree, 7, 30)  # ~3.6k tokens: levels 1 and 2... 2 needs 1024 tokens
    assert tree.count(2) >= 1
    return tree


def test_append_read_roundtrip_and_rebuild(filled, gister):
    msgs = filled.store.messages()
    assert len(msgs) == 30
    start = 0
    for m in msgs:
        role, content, meta = message(7, m.seq)
        assert (m.role, m.content, m.metadata) == (role, content, meta)
        assert m.token_start == start
        start = m.token_end
    assert start == filled.n_tokens == len(filled.store.tokens())
    assert_matches_rebuild(filled, gister)
    assert fsck(filled.store.store.path).clean


def test_header_layout_and_offsets(filled):
    for level in (0, 1, 2):
        f = filled.store.payload(level)
        raw = f.path.read_bytes()
        magic, fmt, lv, block, width, code = struct.unpack("<IHHHIH", raw[:16])
        assert (magic, fmt, lv, block) == (MAGIC, 1, level, 32)
        assert raw[:4] == b"TCCM"  # 0x4D434354 little-endian
        assert width == (1 if level == 0 else 64)
        assert code == (1 if level == 0 else 2)
        assert raw[16:64].rstrip(b"\0") == TINY_MODEL.encode()
        n = filled.count(level)
        assert len(raw) == HEADER_SIZE + n * f.record_size
        i = n - 1  # node i sits at a computable offset
        rec = raw[f.offset(i) : f.offset(i + 1)]
        got = np.frombuffer(rec, f.np_dtype)
        if level == 0:
            assert got[0] == filled.tokens()[i]
        else:
            assert np.array_equal(got, filled.store.gists(level, i, i + 1)[0])


def test_torn_writes_are_cut_on_open(filled, gister):
    path = filled.store.store.path
    sizes = {}
    for level in (0, 1, 2):
        f = filled.store.payload(level)
        sizes[level] = f.path.stat().st_size
        with open(f.path, "ab") as fh:
            fh.write(b"\xff" * 37)
    stray = filled.store.payload(3)  # a level a crashed append started
    stray.open_at(0)
    (filled.store.dir / "L1-other.bin").write_bytes(b"x" * 100)  # another version's leftovers
    rep = fsck(path)
    assert rep.clean and len(rep.notes) == 5, rep.lines()
    tree = open_tree(path, "sess", gister)
    for level in (0, 1, 2):
        assert filled.store.payload(level).path.stat().st_size == sizes[level]
    assert sorted(os.listdir(filled.store.dir)) == sorted(
        ["L0.bin", f"L1-{gister.version}.bin", f"L2-{gister.version}.bin"]
    )
    rep = fsck(path)
    assert rep.clean and not rep.notes, rep.lines()
    fill(tree, 7, 3, start=30)
    assert_matches_rebuild(tree, gister)


@pytest.mark.parametrize(
    "sid",
    ["../../etc/passwd", "/abs/path", "a\0b", "\ud800lone", "", "x" * 5000, "日本😀", ".", "~"],
)
def test_any_string_is_a_session_id(tmp_path, gister, sid):
    tree = open_tree(tmp_path / "st", sid, gister)
    fill(tree, 1, 2)
    store = Store(tmp_path / "st")
    assert store.sessions() == [sid]
    assert store.open_session(sid).id == sid
    (entry,) = os.listdir(tmp_path / "st" / "sessions")
    assert entry == session_key(sid) and all(c in "0123456789abcdef" for c in entry)
    assert set(os.listdir(tmp_path / "st")) <= {
        "index.db",
        "index.db-shm",
        "index.db-wal",
        "locks",
        "sessions",
    }
    assert store.delete_session(sid)
    assert store.sessions() == [] and not os.listdir(tmp_path / "st" / "sessions")


def test_delete_leaves_no_file_and_no_row(tmp_path, gister):
    path = tmp_path / "st"
    marker = "ZQXJ-unique-marker"
    for sid in ("keep-1", "doomed", "keep-2"):
        tree = open_tree(path, sid, gister)
        fill(tree, 3, 40)
        tree.append("user", f"{marker} in {sid}", {"m": f"{marker}-meta"}, [1] * 40)
    store = Store(path)
    key = session_key("doomed")
    assert store.delete_session("doomed")
    assert not store.delete_session("doomed")
    assert store.sessions() == ["keep-1", "keep-2"]
    # the database: no row anywhere mentions the session
    conn = sqlite3.connect(path / "index.db")
    for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in conn.execute(f"SELECT * FROM {table}"):
            text = repr(row)
            assert key not in text and "doomed" not in text, (table, row)
    conn.close()
    # the directory: no file named after it, no file holding its bytes
    assert not (path / "sessions" / key).exists()
    for root, dirs, files in os.walk(path):
        assert key not in root and all(key not in f for f in files + dirs)
    hits = scan_for(path, f"{marker} in doomed".encode())
    assert hits == [], hits
    assert scan_for(path, f"{marker} in keep-1".encode())  # the scan does find live data
    assert fsck(path).clean


def test_orphan_folders_from_interrupted_create_or_delete(tmp_path, gister):
    path = tmp_path / "st"
    tree = open_tree(path, "a", gister)
    fill(tree, 1, 3)
    orphan = path / "sessions" / session_key("b")
    orphan.mkdir()
    (orphan / "L0.bin").write_bytes(b"junk")
    rep = fsck(path)
    assert rep.clean and any("folder of no session" in n for n in rep.notes)
    tree_b = open_tree(path, "b", gister)  # creating "b" wipes the leftover
    assert tree_b.n_tokens == 0 and os.listdir(orphan) == ["L0.bin"]
    orphan2 = path / "sessions" / session_key("c")
    orphan2.mkdir()
    rep = fsck(path, repair=True)
    assert rep.clean and not orphan2.exists()


def test_corrupt_header_is_named_and_repaired(filled, gister):
    path = filled.store.store.path
    f = filled.store.payload(1)
    before = f.path.read_bytes()
    with open(f.path, "r+b") as fh:
        fh.seek(8)  # the block size field
        fh.write(b"\x07")
    with pytest.raises(PayloadError, match=rf"{f.path}.*bad header.*block_size=7 \(expected 32\)"):
        open_tree(path, "sess", gister)
    rep = fsck(path)
    assert not rep.clean and str(f.path) in rep.errors[0] and "bad header" in rep.errors[0]
    assert fsck_main(["--store", str(path), "-q"]) == 1
    assert fsck_main(["--store", str(path), "--repair"]) == 0
    assert f.path.read_bytes() == before
    assert fsck_main(["--store", str(path)]) == 0


def test_corrupt_magic_of_tokens(filled, gister):
    path = filled.store.store.path
    f = filled.store.payload(0)
    with open(f.path, "r+b") as fh:
        fh.write(b"XXXX")
    with pytest.raises(PayloadError, match=rf"{f.path}.*magic"):
        open_tree(path, "sess", gister)
    assert fsck(path, repair=True).clean
    assert_matches_rebuild(open_tree(path, "sess", gister), gister)


def test_truncated_gists_are_named_then_rebuilt(filled, gister):
    path = filled.store.store.path
    f = filled.store.payload(1)
    size = f.path.stat().st_size
    os.truncate(f.path, size - 10)
    with pytest.raises(PayloadError, match=rf"{f.path}: truncated"):
        open_tree(path, "sess", gister)
    rep = fsck(path)
    assert not rep.clean and any(str(f.path) in e and "truncated" in e for e in rep.errors)
    rep = fsck(path, repair=True)
    assert rep.clean, rep.lines()
    assert filled.store.gist_version == NEEDS_REGIST
    tree = open_tree(path, "sess", gister)  # re-gists lazily from the tokens
    assert tree.store.gist_version == gister.version
    assert_matches_rebuild(tree, gister)
    assert fsck(path).clean and not fsck(path).notes


def test_truncated_tokens_are_named_and_not_hidden(filled, gister):
    path = filled.store.store.path
    f = filled.store.payload(0)
    os.truncate(f.path, HEADER_SIZE + 8)
    with pytest.raises(PayloadError, match=rf"{f.path}: truncated"):
        open_tree(path, "sess", gister)
    for repair in (False, True):
        rep = fsck(path, repair=repair)
        assert not rep.clean
        assert any(str(f.path) in e for e in rep.errors)
        assert any("export" in e for e in rep.errors)


def test_deleted_database_is_a_clear_error(filled, gister):
    path = filled.store.store.path
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=rf"{path / 'index.db'} is missing"):
        Store(path)
    rep = fsck(path)
    assert not rep.clean and str(path / "index.db") in rep.errors[0]
    assert fsck_main(["--store", str(path)]) == 1


def test_garbage_database_is_a_clear_error(tmp_path):
    path = tmp_path / "st"
    path.mkdir()
    (path / "index.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=rf"{path / 'index.db'}"):
        Store(path)
    assert not fsck(path).clean


def test_another_gistnet_version_is_refused_until_reindexed(tmp_path, gister):
    path = tmp_path / "st"
    tree = open_tree(path, "a", gister)
    fill(tree, 2, 30)
    other = open_tree(path, "b", gister)
    fill(other, 4, 10)
    g2 = tiny_gister("tiny-v2")
    # a crash during a re-gist: new-version files without the commit are dropped on open
    tree.store.payload(1, "tiny-v2").write_all(np.ones((3, 64), np.float16))
    with pytest.raises(GistVersionMismatch, match="tiny-v1.*tiny-v2.*megacontext reindex"):
        open_tree(path, "a", g2)  # never a silent re-gist at open
    assert tree.store.gist_version == gister.version
    tree2 = open_tree(path, "a", g2, reindex=True)  # explicit
    assert tree2.store.gist_version == "tiny-v2"
    assert_matches_rebuild(tree2, g2)
    assert not any(gister.version in p for p in os.listdir(tree2.store.dir))
    n = tree.store.counts()[0]
    with pytest.raises(GistVersionMismatch):  # a writer still on the old GistNet never mixes:
        fill(tree, 2, 1, start=30)  # its append is kept (tokens), its gisting refused
    with pytest.raises(GistVersionMismatch):
        tree.sync()
    assert tree.store.counts()[0] > n and tree.store.gist_version == "tiny-v2"
    assert open_tree(path, "a", g2).make_gists()  # the current GistNet gists what was kept
    rep = fsck(path, gist_version="tiny-v2")
    assert rep.clean and sum("current is" in n for n in rep.notes) == 1
    recs = reindex(Store(path), g2)  # eager
    assert [r.get("skipped") for r in recs] == ["already current", None]
    assert recs[1]["to"] == "tiny-v2" and "seconds" in recs[1]
    for sid in ("a", "b"):
        t = open_tree(path, sid, g2)
        assert_matches_rebuild(t, g2)
    assert "skipped" not in reindex(Store(path), g2, ["a"], force=True)[0]
    assert fsck(path).clean and not fsck(path).notes


def test_a_session_without_gists_takes_the_version_of_its_writer(tmp_path, gister):
    tree = open_tree(tmp_path / "st", "short", gister)
    tree.append("user", "hi", {}, [1, 2, 3])  # no block complete: nothing to re-gist
    g2 = tiny_gister("tiny-v2")
    assert open_tree(tmp_path / "st", "short", g2).store.gist_version == "tiny-v2"


def test_export_format(filled, tmp_path):
    import io

    buf = io.StringIO()
    assert export_sessions(filled.store.store, buf) == 30
    lines = buf.getvalue().splitlines()
    header = json.loads(lines[0])
    assert header["session"] == "sess" and header["messages"] == 30
    ((h, msgs),) = list(read_export(lines))
    assert [m["content"] for m in msgs] == [m.content for m in filled.store.messages()]
    out = tmp_path / "x.jsonl"
    assert export_main(["--store", str(filled.store.store.path), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == lines
    with pytest.raises(ValueError, match="line 1"):
        list(read_export(['{"role": "user", "content": "x"}']))


def test_threads_share_one_store(tmp_path, gister):
    store = Store(tmp_path / "st")
    errors = []

    def work(t):
        try:
            g = tiny_gister()
            for k in range(3):
                for s in range(4):
                    tree = open_tree(store.path, f"s{s}", g)
                    tree.append("user", f"t{t} k{k}", {"t": t, "k": k}, [t, k] * 20)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for s in range(4):
        msgs = store.open_session(f"s{s}").messages()
        assert sorted((m.metadata["t"], m.metadata["k"]) for m in msgs) == [
            (t, k) for t in range(6) for k in range(3)
        ]
    assert fsck(store.path).clean


def test_lock_of_a_killed_holder_is_released(tmp_path):
    store = Store(tmp_path / "st")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with store.lock("ab" * 16):
            os.write(w, b"x")
            time.sleep(60)
        os._exit(0)
    os.read(r, 1)
    got = threading.Event()

    def take():
        with store.lock("ab" * 16):
            got.set()

    th = threading.Thread(target=take)
    th.start()
    assert not got.wait(0.3)  # really held by the child
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert got.wait(10)
    th.join()
    with store.lock("ab" * 16), store.lock("ab" * 16):  # nests within a thread
        pass


def test_busy_database_waits_instead_of_failing(tmp_path, gister):
    path = tmp_path / "st"
    tree = open_tree(path, "a", gister)
    blocker = sqlite3.connect(path / "index.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    done = threading.Event()

    def release():
        time.sleep(1.0)
        blocker.execute("COMMIT")
        done.set()

    th = threading.Thread(target=release)
    th.start()
    fill(tree, 1, 2)  # waits for the lock, never raises 'database is locked'
    th.join()
    assert done.is_set() and len(tree.store.messages()) == 2


def test_database_deleted_while_in_use_is_never_written_silently(filled, gister):
    path = filled.store.store.path
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(StoreError, match=rf"{path / 'index.db'}"):
        fill(filled, 7, 1, start=30)  # an open connection must not acknowledge into the void
    errors = []

    def other_thread():  # a fresh per-thread connection must fail, not create a new index
        try:
            filled.store.messages()
        except StoreError as e:
            errors.append(e)

    th = threading.Thread(target=other_thread)
    th.start()
    th.join()
    assert errors and str(path / "index.db") in str(errors[0])
    assert not (path / "index.db").exists()
