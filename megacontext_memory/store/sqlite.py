"""The SQLite index: sessions, the lossless message log and committed tree extents.

Write protocol for one message (under the session's lock):
  1. payload records appended at the committed end of each level file, fsynced;
  2. one SQLite transaction inserts the message and moves the committed extents.
A crash before 2 leaves bytes past the extent, which the next writer cuts off; a crash
after 2 loses nothing. A message is acknowledged when `append` returns.

Creating a session makes its folder before the row that makes it visible; deleting one
removes the rows before the folder. A crash in between leaves a folder with no row, which
holds nothing committed: it is wiped when the id is created again and by `fsck --repair`.

Every creation of a session draws a random `incarnation`: a handle opened before the id was
deleted (and perhaps created again, by another process) sees another incarnation and raises
SessionDeleted instead of mixing two histories. A session's row names its payload folder
(its key, or for a session swapped in by `import --replace`, the folder it was built in),
so replacing a session is one SQLite commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import sqlite_utils

from .locks import KeyLocks
from .payload import PayloadError, PayloadFile, _fsync_dir

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY, id BLOB NOT NULL UNIQUE, created REAL NOT NULL,
    model TEXT NOT NULL, width INTEGER NOT NULL, block_size INTEGER NOT NULL,
    gist_dtype TEXT NOT NULL, gist_version TEXT NOT NULL,
    n_tokens INTEGER NOT NULL DEFAULT 0, n_messages INTEGER NOT NULL DEFAULT 0,
    incarnation TEXT NOT NULL DEFAULT '', folder TEXT NOT NULL DEFAULT '',
    staging INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages (
    session_key TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, metadata TEXT NOT NULL, created REAL NOT NULL,
    token_start INTEGER NOT NULL, token_end INTEGER NOT NULL,
    PRIMARY KEY (session_key, seq));
CREATE TABLE IF NOT EXISTS levels (
    session_key TEXT NOT NULL, level INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (session_key, level));
CREATE TABLE IF NOT EXISTS refined_gists (
    session_key TEXT NOT NULL, idx INTEGER NOT NULL, fit TEXT NOT NULL, dtype TEXT NOT NULL,
    vector BLOB NOT NULL, PRIMARY KEY (session_key, idx));
"""
# Every table whose rows belong to one session (by `session_key`); `refined_gists` is a
# cache of level-1 gists refined for showing (see `SessionStore.add_refined`).
SESSION_TABLES = ("messages", "levels", "refined_gists")
NEEDS_REGIST = "needs-regist"  # gists dropped by a repair: made again on next open or reindex
_FILE = re.compile(r"^L(?:0|([1-9][0-9]*)-(.+))\.bin$")
T = TypeVar("T")


class StoreError(RuntimeError):
    """The store or one of its sessions cannot be used as asked."""


class SessionDeleted(StoreError):
    """The session this handle was opened on was deleted (and maybe created anew) since."""


class GistVersionMismatch(StoreError):
    """A session's gists were made by another GistNet version than the one in use."""


@dataclass(frozen=True)
class Message:
    """One message of the lossless log, with the token range it occupies in the tree."""

    seq: int
    role: str
    content: str
    metadata: dict
    created: float
    token_start: int
    token_end: int

    def to_dict(self) -> dict:
        return asdict(self)


def encode_id(session_id: str) -> bytes:
    """Any str (lone surrogates and NULs included) as the bytes stored in the index."""
    return session_id.encode("utf-8", "surrogatepass")


def decode_id(raw: bytes | str) -> str:
    return raw.decode("utf-8", "surrogatepass") if isinstance(raw, bytes) else raw


def session_key(session_id: str) -> str:
    """Directory-safe key for any session id string (never a path)."""
    return hashlib.sha256(encode_id(session_id)).hexdigest()[:32]


def _busy(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def retry(fn: Callable[[], T], what: str = "index") -> T:
    """Run `fn`, retrying while SQLite reports the database busy (never shown to users)."""
    delay = 0.01
    deadline = time.monotonic() + 600
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def check_version(version: str) -> None:
    """GistNet versions name payload files: keep them to a safe alphabet."""
    if not isinstance(version, str) or not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", version
    ):
        raise ValueError(f"bad GistNet version {version!r}: use letters, digits and ._+-")


class Store:
    """A directory holding `index.db`, the `locks` file and one payload folder per session."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.sessions_dir = self.path / "sessions"
        self.sessions_dir.mkdir(exist_ok=True)
        self.db_path = self.path / "index.db"
        if not self.db_path.exists() and any(self.sessions_dir.iterdir()):
            raise StoreError(
                f"{self.db_path} is missing but session payloads exist in {self.sessions_dir}: "
                "the index (and the message log in it) was deleted; "
                f"run `megacontext fsck --store {self.path}` to inspect"
            )
        self._creating = not self.db_path.exists()
        self._local = threading.local()
        self._stale: list[sqlite3.Connection] = []
        self._opened: list[tuple[int, sqlite3.Connection]] = []  # (pid, connection), for close
        self._closed = False
        self._locks = KeyLocks(self.path / "locks")
        try:
            retry(lambda: self._init_schema())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.db_path}: not a usable SQLite index: {e}") from None

    def _init_schema(self) -> None:
        conn = self.db.conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.db_path}: schema version {version} is newer than this code "
                f"({SCHEMA_VERSION}); upgrade megacontext-memory"
            )
        if version < SCHEMA_VERSION:
            with self._write() as c:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        c.execute(stmt)
                have = {r[1] for r in c.execute("PRAGMA table_info(sessions)")}
                for column in ("incarnation TEXT", "folder TEXT"):  # schema 1 -> 2
                    if column.split()[0] not in have:
                        c.execute(f"ALTER TABLE sessions ADD COLUMN {column} NOT NULL DEFAULT ''")
                if "staging" not in have:
                    c.execute("ALTER TABLE sessions ADD COLUMN staging INTEGER NOT NULL DEFAULT 0")
                c.execute(
                    "UPDATE sessions SET incarnation = lower(hex(randomblob(8))) "
                    "WHERE incarnation = ''"
                )
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---- connections ----------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """A per-thread (and per-process) connection: WAL, FULL sync, long busy timeout."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed")
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid != os.getpid():
            # Inherited across fork: never use it, and never let it be closed here.
            self._stale.append(db.conn)
            db = None
        if db is None:
            # Only the first connection of a new store may create the file: a connection
            # opened after index.db was deleted must fail, not start an empty index.
            mode = "rwc" if self._creating else "rw"
            uri = f"file:{urllib.parse.quote(str(self.db_path.absolute()))}?mode={mode}"
            try:
                conn = sqlite3.connect(
                    uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False
                )
            except sqlite3.OperationalError as e:
                raise StoreError(f"{self.db_path}: cannot open the index ({e})") from None
            self._opened.append((os.getpid(), conn))
            self._creating = False
            self._local.ino = os.stat(self.db_path).st_ino
            retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")  # deleted sessions leave no bytes behind
            conn.execute("PRAGMA busy_timeout=60000")
            db = self._local.db = sqlite_utils.Database(conn)
            self._local.pid = os.getpid()
        return db

    def close(self) -> None:
        """Close every connection this process opened on the index, in any thread, so
        SQLite folds its write-ahead log into index.db now rather than when they are
        collected; using the store afterwards raises StoreError. Closing twice is fine."""
        self._closed = True
        pid = os.getpid()
        for owner, conn in self._opened:
            if owner == pid:  # a connection inherited across fork is the parent's to close
                conn.close()
        self._opened = []

    def query(self, sql: str, params: list | tuple = ()) -> list[dict]:
        """Rows of a read query as dicts (retried while the database is busy)."""
        return retry(lambda: list(self.db.query(sql, params)))

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so the
        transaction never has to upgrade (the case where SQLite gives up without waiting)."""
        conn = self.db.conn
        retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            try:
                same = os.stat(self.db_path).st_ino == self._local.ino
            except FileNotFoundError:
                same = False
            if not same:  # never acknowledge a write into a deleted or replaced index
                raise StoreError(
                    f"{self.db_path} was deleted or replaced while in use; "
                    f"run `megacontext fsck --store {self.path}`"
                )
            yield conn
            retry(lambda: conn.execute("COMMIT"))
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every query in it sees the same committed state."""
        conn = self.db.conn
        if conn.in_transaction:  # inside a write: it already sees one state
            yield conn
            return
        retry(lambda: conn.execute("BEGIN"))
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    # ---- sessions -------------------------------------------------------------------
    def sessions(self) -> list[str]:
        """Every session id, oldest first (sessions still being built by an import are not
        listed)."""
        rows = self.query("SELECT id FROM sessions WHERE staging = 0 ORDER BY rowid")
        return [decode_id(r["id"]) for r in rows]

    def has_session(self, session_id: str) -> bool:
        row = self._row(session_key(session_id))
        return row is not None and not row["staging"]

    def _row(self, key: str) -> dict | None:
        rows = self.query("SELECT * FROM sessions WHERE key = ?", [key])
        return rows[0] if rows else None

    def session(
        self,
        session_id: str,
        *,
        model: str,
        width: int,
        block_size: int,
        gist_dtype: str,
        gist_version: str,
        staging: bool = False,
    ) -> SessionStore:
        """Open a session, creating it on first use. Refuses a different model or width.

        `staging` creates a session that is not listed until `swap_in` makes it another's.
        """
        if not isinstance(session_id, str):
            raise TypeError(f"session id must be a str, got {type(session_id).__name__}")
        check_version(gist_version)
        key = session_key(session_id)
        with self.lock(key):
            row = self._row(key)
            if row is None:
                folder = self.sessions_dir / key
                if folder.exists():  # left by a crash during create or delete: nothing committed
                    shutil.rmtree(folder)
                folder.mkdir()
                _fsync_dir(self.sessions_dir)
                with self._write() as conn:
                    conn.execute(
                        "INSERT INTO sessions (key, id, created, model, width, block_size, "
                        "gist_dtype, gist_version, incarnation, folder, staging) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [
                            key,
                            encode_id(session_id),
                            time.time(),
                            model,
                            width,
                            block_size,
                            gist_dtype,
                            gist_version,
                            os.urandom(8).hex(),
                            key,
                            int(staging),
                        ],
                    )
                row = self._row(key)
            elif (row["model"], row["width"]) != (model, width):
                raise StoreError(
                    f"session {session_id!r} was written with model {row['model']!r} "
                    f"(width {row['width']}), not {model!r} (width {width})"
                )
        return SessionStore(self, row)

    def open_session(self, session_id: str) -> SessionStore:
        """An existing session, whatever model wrote it (for tools: fsck, export)."""
        row = self._row(session_key(session_id))
        if row is None or row["staging"]:
            raise StoreError(f"no session {session_id!r} in {self.path}")
        return SessionStore(self, row)

    def delete_session(self, session_id: str) -> bool:
        """Delete every row and file of a session. Returns False if it did not exist."""
        key = session_key(session_id)
        with self.lock(key):
            row = self._row(key)
            if row is not None:
                with self._write() as conn:
                    _delete_rows(conn, key)
            self._remove_folders({key, row["folder"] if row else key})
        if row is not None:  # move the zeroed pages out of the WAL too (best effort)
            with contextlib.suppress(sqlite3.OperationalError):
                self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return row is not None

    def _remove_folders(self, names: set[str]) -> None:
        removed = False
        for name in names:
            if name and (self.sessions_dir / name).exists():
                shutil.rmtree(self.sessions_dir / name)
                removed = True
        if removed:
            _fsync_dir(self.sessions_dir)

    def swap_in(self, staged: SessionStore, session_id: str) -> None:
        """Make the staging session `staged` the session `session_id`, replacing the one of
        that id (if any) in one SQLite commit; the replaced session's files go afterwards.

        A crash before the commit leaves the original; after it, the new session, and the
        old folder at worst (a folder of no session: `fsck --repair` removes it).
        """
        key = session_key(session_id)
        with contextlib.ExitStack() as stack:
            for k in sorted({key, staged.key}):
                stack.enter_context(self.lock(k))
            staged.row()  # still there, still the same incarnation
            old = self._row(key)
            with self._write() as conn:
                if old is not None:
                    _delete_rows(conn, key)
                conn.execute(
                    "UPDATE sessions SET key = ?, id = ?, staging = 0 WHERE key = ?",
                    [key, encode_id(session_id), staged.key],
                )
                for table in SESSION_TABLES:
                    conn.execute(
                        f"UPDATE {table} SET session_key = ? WHERE session_key = ?",
                        [key, staged.key],
                    )
            if old is not None and old["folder"] != staged.folder:
                self._remove_folders({old["folder"]})

    def lock(self, key: str):
        """Context manager serialising writers of one session (threads and processes)."""
        return self._locks.hold(key)


def _delete_rows(conn: sqlite3.Connection, key: str) -> None:
    for table in SESSION_TABLES:
        conn.execute(f"DELETE FROM {table} WHERE session_key = ?", [key])
    conn.execute("DELETE FROM sessions WHERE key = ?", [key])


class SessionStore:
    """One incarnation of a session: its rows and payload files. Writers hold `lock()`
    around read-modify-write; every read and write checks that the incarnation is current."""

    def __init__(self, store: Store, row: dict):
        self.store, self.key, self.id = store, row["key"], decode_id(row["id"])
        self.model, self.width = row["model"], row["width"]
        self.block_size, self.gist_dtype = row["block_size"], row["gist_dtype"]
        self.incarnation = row["incarnation"]
        self.folder = row["folder"] or self.key
        self.dir = store.sessions_dir / self.folder

    def lock(self):
        return self.store.lock(self.key)

    # ---- committed state ------------------------------------------------------------
    def _deleted(self) -> SessionDeleted:
        return SessionDeleted(
            f"session {self.id!r} was deleted (or deleted and created again) since it was "
            "opened; open it again"
        )

    def _check(self, conn: sqlite3.Connection) -> tuple:
        """(gist_version, n_messages, n_tokens) of this incarnation, inside a transaction."""
        row = conn.execute(
            "SELECT gist_version, n_messages, n_tokens, incarnation FROM sessions WHERE key = ?",
            [self.key],
        ).fetchone()
        if row is None or row[3] != self.incarnation:
            raise self._deleted()
        return row[:3]

    def row(self) -> dict:
        row = self.store._row(self.key)
        if row is None or row["incarnation"] != self.incarnation:
            raise self._deleted()
        return row

    @property
    def gist_version(self) -> str:
        return self.row()["gist_version"]

    def state(self) -> tuple[dict[int, int], str]:
        """(committed record count per level, GistNet version), read at one instant."""
        with self.store._read() as conn:
            version = self._check(conn)[0]
            rows = conn.execute(
                "SELECT level, count FROM levels WHERE session_key = ?", [self.key]
            ).fetchall()
        return {level: count for level, count in rows if count}, version

    def counts(self) -> dict[int, int]:
        """Committed record count per level (level 0 = tokens)."""
        return self.state()[0]

    def payload(self, level: int, version: str | None = None) -> PayloadFile:
        if level == 0:
            return PayloadFile(self.dir / "L0.bin", 0, 1, "uint32", self.model, self.block_size)
        version = version or self.gist_version
        return PayloadFile(
            self.dir / f"L{level}-{version}.bin",
            level,
            self.width,
            self.gist_dtype,
            self.model,
            self.block_size,
        )

    def prepare(self) -> dict[int, int]:
        """Under the lock: restore the last committed state of the files; returns counts.

        Bytes past a committed extent are cut; files that hold nothing committed (levels a
        crashed append started, another GistNet version's gists, temporary files) go.
        """
        return self._prepare()[0]

    def _prepare(self) -> tuple[dict[int, int], str]:
        counts, version = self.state()
        if not self.dir.is_dir():
            if counts:
                raise PayloadError(f"{self.dir}: session folder missing, {counts} committed")
            self.dir.mkdir()
            _fsync_dir(self.store.sessions_dir)
        keep = {"L0.bin"} | {self.payload(lv, version).path.name for lv in counts if lv}
        for name in os.listdir(self.dir):
            if name not in keep:
                (self.dir / name).unlink()
        for level in sorted(set(counts) | {0}):
            self.payload(level, version).open_at(counts.get(level, 0))
        return counts, version

    # ---- writes ---------------------------------------------------------------------
    def append(
        self,
        role: str,
        content: str,
        metadata: dict,
        tokens: np.ndarray,
        created: float | None = None,
    ) -> Message:
        """Durably append one message and its tokens (under `lock()`); see `extend`."""
        return self.extend([(role, content, metadata, tokens, created)])[0]

    def extend(self, messages: list[tuple]) -> list[Message]:
        """Durably append messages `(role, content, metadata, tokens, created or None)` in
        one commit: their tokens are written and fsynced, then one SQLite transaction makes
        them visible. Gists come later (`add_gists`). Must be called under `lock()`."""
        rows, token_parts = [], []
        for role, content, metadata, tokens, created in messages:
            meta_json = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
            for name, text in (("role", role), ("content", content), ("metadata", meta_json)):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"message {name} is not valid unicode text: {e}") from None
            created = time.time() if created is None else float(created)
            rows.append((role, content, meta_json, created, len(tokens)))
            token_parts.append(np.asarray(tokens, dtype=np.uint32).reshape(-1))
        counts, version = self._prepare()
        n0 = counts.get(0, 0)
        if token_parts:
            self.payload(0).write_at(n0, np.concatenate(token_parts).reshape(-1, 1))
        out: list[Message] = []
        with self.store._write() as conn:
            v_now, seq, n_tokens = self._check(conn)
            if n_tokens != n0 or v_now != version:
                raise StoreError(f"session {self.id!r} changed while appending (lock not held?)")
            start = n0
            for role, content, meta_json, created, n in rows:
                conn.execute(
                    "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)",
                    [self.key, seq, role, content, meta_json, created, start, start + n],
                )
                out.append(
                    Message(seq, role, content, json.loads(meta_json), created, start, start + n)
                )
                seq, start = seq + 1, start + n
            self._set_counts(conn, {0: start})
            conn.execute(
                "UPDATE sessions SET n_tokens = ?, n_messages = ? WHERE key = ?",
                [start, seq, self.key],
            )
        return out

    def add_gists(self, gists: dict[int, np.ndarray], version: str) -> None:
        """Durably append gists made since the last call: `gists[level]` continues that
        level from its committed count. Must be called under `lock()`, with gists of
        GistNet `version` computed against the committed state."""
        counts, v_now = self._prepare()
        if version != v_now:
            raise GistVersionMismatch(
                f"session {self.id!r} holds gists of GistNet {v_now!r}; refusing gists "
                f"of {version!r} (re-gist first)"
            )
        new_counts = {}
        for level, arr in sorted(gists.items()):
            if len(arr):
                f = self.payload(level, version)
                f.open_at(counts.get(level, 0))
                f.write_at(counts.get(level, 0), arr)
                new_counts[level] = counts.get(level, 0) + len(arr)
        if not new_counts:
            return
        with self.store._write() as conn:
            v, _, _ = self._check(conn)
            if v != version:
                raise StoreError(f"session {self.id!r} changed while gisting (lock not held?)")
            self._set_counts(conn, new_counts)

    def _set_counts(self, conn: sqlite3.Connection, counts: dict[int, int]) -> None:
        for level, count in counts.items():
            conn.execute(
                "INSERT INTO levels (session_key, level, count) VALUES (?,?,?) "
                "ON CONFLICT(session_key, level) DO UPDATE SET count = excluded.count",
                [self.key, level, count],
            )

    def replace_gists(self, gists: dict[int, np.ndarray], version: str) -> None:
        """Swap in every gist level, made by GistNet `version` (under `lock()`).

        Each level file is written whole under a temporary name, fsynced and renamed; the
        SQLite commit then switches the session to `version`. A crash before the commit
        leaves the old version intact and visible (new-version files are wiped on open).
        Re-gisting with the same version rewrites the same deterministic values.
        """
        check_version(version)
        old = self.gist_version
        for level, arr in sorted(gists.items()):
            self.payload(level, version).write_all(arr)
        with self.store._write() as conn:
            self._check(conn)
            conn.execute("DELETE FROM levels WHERE session_key = ? AND level > 0", [self.key])
            conn.execute("DELETE FROM refined_gists WHERE session_key = ?", [self.key])
            for level, arr in gists.items():
                if len(arr):
                    conn.execute("INSERT INTO levels VALUES (?,?,?)", [self.key, level, len(arr)])
            conn.execute("UPDATE sessions SET gist_version = ? WHERE key = ?", [version, self.key])
        if old != version:
            self.prepare()  # drop the old version's files

    def add_refined(self, vectors: dict[int, np.ndarray], fit: str, version: str) -> None:
        """Keep level-1 gists refined by `fit` from GistNet `version`'s (index -> [d]).

        A cache, not history: no lock is needed and a crash loses nothing that cannot be
        made again. Rows are refused when the session has meanwhile been re-gisted (other
        gists were refined) and are dropped with the gists they were made from."""
        with self.store._write() as conn:
            v_now = self._check(conn)[0]
            if v_now != version:
                return
            n = conn.execute(
                "SELECT count FROM levels WHERE session_key = ? AND level = 1", [self.key]
            ).fetchone()
            conn.executemany(
                "INSERT OR REPLACE INTO refined_gists VALUES (?,?,?,?,?)",
                [
                    (self.key, int(i), fit, str(v.dtype), np.ascontiguousarray(v).tobytes())
                    for i, v in vectors.items()
                    if n is not None and 0 <= i < n[0]
                ],
            )

    def refined(self, indices: list[int], fit: str) -> dict[int, np.ndarray]:
        """The cached level-1 gists refined by `fit` among `indices` (index -> [d])."""
        if not indices:
            return {}
        wanted = set(indices)
        with self.store._read() as conn:
            self._check(conn)
            rows = conn.execute(
                "SELECT idx, dtype, vector FROM refined_gists WHERE session_key = ? AND fit = ? "
                "AND idx BETWEEN ? AND ?",
                [self.key, fit, min(wanted), max(wanted)],
            ).fetchall()
        return {i: np.frombuffer(v, dtype=d) for i, d, v in rows if i in wanted}

    # ---- reads ----------------------------------------------------------------------
    def messages(
        self, start: int = 0, end: int | None = None, role: str | None = None
    ) -> list[Message]:
        """The message log (seq in [start, end); only `role`'s when given), oldest first."""
        end = 2**62 if end is None else end
        where = "" if role is None else " AND role = ?"
        return self._messages(
            f"SELECT * FROM messages WHERE session_key = ? AND seq >= ? AND seq < ?{where} "
            "ORDER BY seq",
            [self.key, start, end] + ([] if role is None else [role]),
        )

    def last_message(self, role: str) -> Message | None:
        """The newest message of `role`, without reading the whole log."""
        rows = self._messages(
            "SELECT * FROM messages WHERE session_key = ? AND role = ? ORDER BY seq DESC LIMIT 1",
            [self.key, role],
        )
        return rows[0] if rows else None

    def _messages(self, sql: str, params: list) -> list[Message]:
        with self.store._read() as conn:
            self._check(conn)
            cur = conn.execute(sql, params)
            names = [c[0] for c in cur.description]
            return [_message(dict(zip(names, r, strict=True))) for r in cur.fetchall()]

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        n = self.counts().get(0, 0)
        end = n if end is None else min(end, n)
        return self._read(0, None, start, end)[:, 0].astype(np.int64)

    def gists(self, level: int, start: int, end: int, version: str | None = None) -> np.ndarray:
        """Gist records [start, end) of `level` (of GistNet `version`; default: current)."""
        for attempt in range(3):
            v = version or self.gist_version
            try:
                return self._read(level, v, start, end)
            except PayloadError:
                # another process may have re-gisted between reading the version and the file
                if version is not None or attempt == 2 or v == self.gist_version:
                    raise
        raise AssertionError("unreachable")

    def _read(self, level: int, version: str | None, start: int, end: int) -> np.ndarray:
        """Records of one payload file. A file that vanished because another thread or
        process deleted the session after the counts were read is SessionDeleted (the rows
        go first, then the files), not a fault of the store."""
        try:
            return self.payload(level, version).read(start, end)
        except PayloadError:
            self.row()  # raises SessionDeleted when this incarnation is gone
            raise


def _message(r: dict) -> Message:
    return Message(
        r["seq"],
        r["role"],
        r["content"],
        json.loads(r["metadata"]),
        r["created"],
        r["token_start"],
        r["token_end"],
    )


def file_level(name: str) -> tuple[int, str | None] | None:
    """(level, version) of a payload file name, or None if it is not one."""
    m = _FILE.match(name)
    if not m:
        return None
    return (0, None) if m.group(1) is None else (int(m.group(1)), m.group(2))
