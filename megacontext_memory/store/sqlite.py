"""The SQLite index: sessions, the lossless message log and committed tree extents.

Write protocol for one message (under the session's lock):
  1. payload records appended at the committed end of each level file, fsynced;
  2. one SQLite transaction inserts the message and moves the committed extents.
A crash before 2 leaves bytes past the extent, which the next writer cuts off; a crash
after 2 loses nothing. A message is acknowledged when `append` returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import sqlite_utils

from .payload import PayloadFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE, created REAL NOT NULL,
    model TEXT NOT NULL, width INTEGER NOT NULL, block_size INTEGER NOT NULL,
    gist_dtype TEXT NOT NULL, gist_version TEXT NOT NULL,
    n_tokens INTEGER NOT NULL DEFAULT 0, n_messages INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS messages (
    session_key TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, metadata TEXT NOT NULL, created REAL NOT NULL,
    token_start INTEGER NOT NULL, token_end INTEGER NOT NULL,
    PRIMARY KEY (session_key, seq));
CREATE TABLE IF NOT EXISTS levels (
    session_key TEXT NOT NULL, level INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (session_key, level));
"""


class StoreError(RuntimeError):
    """The store or one of its sessions cannot be used as asked."""


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


def session_key(session_id: str) -> str:
    """Directory-safe key for any session id string (never a path)."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _KeyLocks:
    """Exclusive per-session lock across threads (threading) and processes (fcntl)."""

    _registry: dict[str, tuple[int, dict[str, threading.RLock]]] = {}
    _guard = threading.Lock()

    def __init__(self, lock_path: Path):
        with self._guard:
            path = str(lock_path)
            if path not in self._registry:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                self._registry[path] = (fd, {})
            self.fd, self.thread_locks = self._registry[path]

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            tlock = self.thread_locks.setdefault(key, threading.RLock())
        with tlock:
            offset = int(key[:15], 16)  # a byte range of the shared lock file per session
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)


class Store:
    """A directory holding `index.db` and one payload folder per session."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "sessions").mkdir(exist_ok=True)
        self.db_path = self.path / "index.db"
        if not self.db_path.exists() and any((self.path / "sessions").iterdir()):
            raise StoreError(
                f"{self.db_path} is missing but session payloads exist: the index was deleted; "
                "run `megacontext fsck --store PATH` to inspect"
            )
        self._local = threading.local()
        self._locks = _KeyLocks(self.path / "locks")
        self.db.conn.executescript(SCHEMA)

    # ---- connections ----------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """A per-thread connection (WAL, long busy timeout: callers never see 'locked')."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.db_path, timeout=120, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=120000")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self.db.conn
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:  # pragma: no cover - timing dependent
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ---- sessions -------------------------------------------------------------------
    def sessions(self) -> list[str]:
        return [r["id"] for r in self.db.query("SELECT id FROM sessions ORDER BY created, id")]

    def has_session(self, session_id: str) -> bool:
        return self._row(session_key(session_id)) is not None

    def _row(self, key: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM sessions WHERE key = ?", [key]))
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
    ) -> SessionStore:
        """Open a session, creating it on first use. Refuses a different model or width."""
        if not isinstance(session_id, str):
            raise TypeError(f"session id must be a str, got {type(session_id).__name__}")
        key = session_key(session_id)
        with self.lock(key):
            row = self._row(key)
            if row is None:
                (self.path / "sessions" / key).mkdir(exist_ok=True)
                with self._write() as conn:
                    conn.execute(
                        "INSERT INTO sessions (key, id, created, model, width, block_size, "
                        "gist_dtype, gist_version) VALUES (?,?,?,?,?,?,?,?)",
                        [
                            key,
                            session_id,
                            time.time(),
                            model,
                            width,
                            block_size,
                            gist_dtype,
                            gist_version,
                        ],
                    )
                row = self._row(key)
            elif (row["model"], row["width"]) != (model, width):
                raise StoreError(
                    f"session {session_id!r} was written with model {row['model']!r} "
                    f"(width {row['width']}), not {model!r} (width {width})"
                )
        return SessionStore(self, row)

    def delete_session(self, session_id: str) -> bool:
        """Delete every row and file of a session. Returns False if it did not exist."""
        key = session_key(session_id)
        with self.lock(key):
            if self._row(key) is None:
                return False
            with self._write() as conn:
                for table in ("messages", "levels"):
                    conn.execute(f"DELETE FROM {table} WHERE session_key = ?", [key])
                conn.execute("DELETE FROM sessions WHERE key = ?", [key])
            shutil.rmtree(self.path / "sessions" / key, ignore_errors=True)
            return True

    def lock(self, key: str):
        """Context manager serialising writers of one session (threads and processes)."""
        return self._locks.hold(key)


class SessionStore:
    """One session's rows and payload files. Writers hold `lock()` around read-modify-write."""

    def __init__(self, store: Store, row: dict):
        self.store, self.key, self.id = store, row["key"], row["id"]
        self.model, self.width = row["model"], row["width"]
        self.block_size, self.gist_dtype = row["block_size"], row["gist_dtype"]
        self.dir = store.path / "sessions" / self.key

    def lock(self):
        return self.store.lock(self.key)

    # ---- committed state ------------------------------------------------------------
    def row(self) -> dict:
        row = self.store._row(self.key)
        if row is None:
            raise StoreError(f"session {self.id!r} was deleted")
        return row

    @property
    def gist_version(self) -> str:
        return self.row()["gist_version"]

    def counts(self) -> dict[int, int]:
        """Committed record count per level (level 0 = tokens)."""
        rows = self.store.db.query(
            "SELECT level, count FROM levels WHERE session_key = ?", [self.key]
        )
        return {r["level"]: r["count"] for r in rows}

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
        """Under the lock: cut torn writes, make sure files exist; returns committed counts."""
        counts = self.counts()
        self.dir.mkdir(exist_ok=True)
        for level in range(max(counts, default=0) + 2):
            self.payload(level).open_at(counts.get(level, 0))
        return counts

    # ---- writes ---------------------------------------------------------------------
    def append(
        self,
        role: str,
        content: str,
        metadata: dict,
        tokens: np.ndarray,
        gists: dict[int, np.ndarray],
    ) -> Message:
        """Durably append one message: its tokens and the gists it completed.

        Must be called under `lock()` after `prepare()`, with gists computed against the
        committed state.
        """
        counts = self.prepare()
        meta_json = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
        n0 = counts.get(0, 0)
        self.payload(0).write_at(n0, np.asarray(tokens, dtype=np.uint32).reshape(-1, 1))
        new_counts = {0: n0 + len(tokens)}
        for level, arr in sorted(gists.items()):
            if len(arr):
                self.payload(level).open_at(counts.get(level, 0))
                self.payload(level).write_at(counts.get(level, 0), arr)
                new_counts[level] = counts.get(level, 0) + len(arr)
        with self.store._write() as conn:
            row = conn.execute(
                "SELECT n_messages FROM sessions WHERE key = ?", [self.key]
            ).fetchone()
            if row is None:
                raise StoreError(f"session {self.id!r} was deleted")
            seq = row[0]
            created = time.time()
            conn.execute(
                "INSERT INTO messages VALUES (?,?,?,?,?,?,?,?)",
                [self.key, seq, role, content, meta_json, created, n0, n0 + len(tokens)],
            )
            for level, count in new_counts.items():
                conn.execute(
                    "INSERT INTO levels (session_key, level, count) VALUES (?,?,?) "
                    "ON CONFLICT(session_key, level) DO UPDATE SET count = excluded.count",
                    [self.key, level, count],
                )
            conn.execute(
                "UPDATE sessions SET n_tokens = ?, n_messages = ? WHERE key = ?",
                [n0 + len(tokens), seq + 1, self.key],
            )
        return Message(seq, role, content, metadata, created, n0, n0 + len(tokens))

    def replace_gists(self, gists: dict[int, np.ndarray], version: str) -> None:
        """Swap in gists made by another GistNet version (under `lock()`).

        New files carry the version in their name, so a crash before the commit leaves
        the old version intact and visible.
        """
        old = self.gist_version
        for level, arr in gists.items():
            f = self.payload(level, version)
            f.path.unlink(missing_ok=True)
            f.open_at(0)
            f.write_at(0, arr)
        with self.store._write() as conn:
            conn.execute("DELETE FROM levels WHERE session_key = ? AND level > 0", [self.key])
            for level, arr in gists.items():
                conn.execute("INSERT INTO levels VALUES (?,?,?)", [self.key, level, len(arr)])
            conn.execute("UPDATE sessions SET gist_version = ? WHERE key = ?", [version, self.key])
        if old != version:
            for path in self.dir.glob(f"L*-{old}.bin"):
                path.unlink()

    # ---- reads ----------------------------------------------------------------------
    def messages(self) -> list[Message]:
        rows = self.store.db.query(
            "SELECT * FROM messages WHERE session_key = ? ORDER BY seq", [self.key]
        )
        return [
            Message(
                r["seq"],
                r["role"],
                r["content"],
                json.loads(r["metadata"]),
                r["created"],
                r["token_start"],
                r["token_end"],
            )
            for r in rows
        ]

    def tokens(self, start: int = 0, end: int | None = None) -> np.ndarray:
        n = self.counts().get(0, 0)
        end = n if end is None else min(end, n)
        return self.payload(0).read(start, end)[:, 0].astype(np.int64)

    def gists(self, level: int, start: int, end: int) -> np.ndarray:
        return self.payload(level).read(start, end)
