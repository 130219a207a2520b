"""Session routing shared by the framework adapters (no framework imports here).

Frameworks call a chat model with the whole conversation every turn (LangGraph state,
RunnableWithMessageHistory, a plain list). The router recognises the part of that list
the engine has already ingested and ingests only the rest, so the history is never
re-ingested or re-prefilled whole.

How: every non-system message gets a chained digest ``d_i = H(d_{i-1}, role, text)``.
Each session records its *head* (the digest of its newest message) in a small SQLite
file beside the engine's index. A call whose digests contain a session's head continues
that session with the messages after it; a call that matches nothing starts a new
session; a call that matches an older point of a session (a regenerate, two users with
the same first message) forks into a new session rather than corrupting the old one.
System messages are not chained: each distinct system text is ingested once per session
(prompt templates and agents resend theirs every call). An explicit session id routes to
that session; the messages after its head are ingested, or all given messages when the
list does not contain its head (the caller passes only the new turn).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .engine import MegaContextEngine, Session

ORIGIN = "mc_origin"  # metadata key saying who ingested a message and why


@dataclass(frozen=True)
class Item:
    """One framework message in the engine's terms."""

    role: str  # system | user | assistant | tool
    text: str  # exactly what is ingested (tool calls rendered into it)
    metadata: dict = field(default_factory=dict, compare=False)


def digest(prev: str, item: Item) -> str:
    h = hashlib.sha256(f"{prev}\x1f{item.role}\x1f{item.text}".encode())
    return h.hexdigest()[:32]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (session_id TEXT PRIMARY KEY, digest TEXT NOT NULL,
                                  n INTEGER NOT NULL, updated REAL NOT NULL,
                                  prev TEXT NOT NULL DEFAULT '',
                                  unclaimed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS heads_digest ON heads(digest);
CREATE INDEX IF NOT EXISTS heads_prev ON heads(prev);
CREATE TABLE IF NOT EXISTS systems (session_id TEXT NOT NULL, digest TEXT NOT NULL,
                                    token_pos INTEGER NOT NULL,
                                    PRIMARY KEY (session_id, digest));
CREATE TABLE IF NOT EXISTS pending (session_id TEXT PRIMARY KEY, base TEXT NOT NULL,
                                    digests TEXT NOT NULL);
"""


@dataclass
class Turn:
    """A routed call: the session, what was ingested, and the head before the reply."""

    router: Router
    session: Session
    base: str  # head digest before this call's new messages
    head: str  # head digest after them (the reply chains onto this)
    n: int  # chained messages in the session so far
    ingested: list[Item]
    new_digests: list[str]

    @property
    def session_id(self) -> str:
        return self.session.id

    def commit_reply(self, item: Item | None) -> str:
        """Record the reply the engine appended (None or empty: nothing to chain)."""
        digests, prev, replied = list(self.new_digests), "", False
        if item is not None and item.text.strip():
            prev, replied = self.head, True
            self.head = digest(self.head, item)
            self.n += 1
            digests.append(self.head)
        self.router._set_head(
            self.session.id, self.head, self.n, (self.base, digests), prev, replied
        )
        return self.head


class Router:
    """Maps framework message lists onto engine sessions (one per store and framework)."""

    def __init__(self, engine: MegaContextEngine, name: str, id_prefix: str):
        self.engine = engine
        self.path = Path(engine.store.path) / f"{name}-routes.db"
        self.id_prefix = id_prefix
        self._local = threading.local()
        self._locks: dict[str, threading.RLock] = {}
        self._guard = threading.Lock()
        self._conn.executescript(SCHEMA)

    # ---- sqlite -------------------------------------------------------------------------
    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=120000")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def lock(self, session_id: str) -> threading.RLock:
        with self._guard:
            return self._locks.setdefault(session_id, threading.RLock())

    def head(self, session_id: str) -> tuple[str, int]:
        row = self._conn.execute(
            "SELECT digest, n FROM heads WHERE session_id = ?", [session_id]
        ).fetchone()
        return (row[0], row[1]) if row else ("", 0)

    def _set_head(self, session_id, head, n, pending=None, prev="", unclaimed=False) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO heads (session_id, digest, n, updated, prev, unclaimed) "
                "VALUES (?,?,?,?,?,?)",
                [session_id, head, n, time.time(), prev, int(unclaimed)],
            )
            if pending is not None:
                c.execute(
                    "INSERT OR REPLACE INTO pending (session_id, base, digests) VALUES (?,?,?)",
                    [session_id, pending[0], json.dumps(pending[1])],
                )

    def forget(self, session_id: str) -> None:
        with self._tx() as c:
            for table in ("heads", "systems", "pending"):
                c.execute(f"DELETE FROM {table} WHERE session_id = ?", [session_id])

    # ---- routing ------------------------------------------------------------------------
    def find(self, items: list[Item], session_id: str | None = None):
        """(session id, index of the first new chained item, base digest, n) for `items`."""
        chained = [it for it in items if it.role != "system"]
        digests, prev = [], ""
        for it in chained:
            prev = digest(prev, it)
            digests.append(prev)
        index = {d: i + 1 for i, d in enumerate(digests)}

        def after_reply(prev: str) -> int | None:
            # The framework may resend our last reply reformatted (ReAct, parsers): the
            # list holds the point before it and then an assistant message in its place.
            k = index.get(prev) if prev else None
            if k is not None and k < len(chained) and chained[k].role == "assistant":
                return k + 1
            return None

        if session_id is not None:
            row = self._conn.execute(
                "SELECT digest, n, prev FROM heads WHERE session_id = ?", [session_id]
            ).fetchone()
            head, n, prev = row if row else ("", 0, "")
            if head and head in index:
                return session_id, index[head], head, n
            k = after_reply(prev)
            return session_id, k or 0, head, n  # no match: the caller passes only new ones
        if digests:
            marks = ",".join("?" * len(digests))
            rows = self._conn.execute(
                f"SELECT session_id, digest, n, prev FROM heads WHERE digest IN ({marks}) "
                f"OR prev IN ({marks})",
                digests + digests,
            ).fetchall()
            best = None
            for sid, d, n, prev in rows:
                k = index.get(d) or after_reply(prev)
                if k and (best is None or k > best[1]) and self.engine.store.has_session(sid):
                    best = (sid, k, d, n)
            if best is not None:
                return best
        return f"{self.id_prefix}{uuid.uuid4().hex[:16]}", 0, "", 0

    @contextlib.contextmanager
    def turn(
        self,
        items: list[Item],
        session_id: str | None = None,
        extra_systems: list[Item] = (),
        system_refresh_tokens: int | None = None,
    ) -> Iterator[Turn]:
        """Route `items`, ingest what is new, and hold the session for the reply."""
        for _ in range(3):  # another thread may move the head between find and lock
            sid, k, base, n = self.find(items, session_id)
            lock = self.lock(sid)
            lock.acquire()
            if self.head(sid)[0] == base or session_id is not None:
                break
            lock.release()
        else:
            sid, k, base, n = self.find([], None)
            lock = self.lock(sid)
            lock.acquire()
        try:
            session = self.engine.session(sid)
            chained = [it for it in items if it.role != "system"]
            systems = [it for it in items if it.role == "system"] + list(extra_systems)
            new_sys = self._new_systems(sid, session, systems, system_refresh_tokens)
            ingested, new_digests, head = [], [], base
            for it in new_sys:
                self._append(session, it)
                ingested.append(it)
            for it in chained[k:]:
                self._append(session, it)
                head = digest(head, it)
                new_digests.append(head)
                ingested.append(it)
            n += len(chained) - k
            self._set_head(sid, head, n)
            yield Turn(self, session, base, head, n, ingested, new_digests)
        finally:
            lock.release()

    def _new_systems(self, sid, session, systems, refresh) -> list[Item]:
        out, seen = [], set()
        pos = session.token_count()
        for it in systems:
            d = text_digest(it.text)
            if d in seen or not it.text.strip():
                continue
            seen.add(d)
            row = self._conn.execute(
                "SELECT token_pos FROM systems WHERE session_id = ? AND digest = ?", [sid, d]
            ).fetchone()
            if row is not None and (refresh is None or pos - row[0] <= refresh):
                continue
            out.append(it)
        if out:
            with self._tx() as c:
                for it in out:
                    c.execute(
                        "INSERT OR REPLACE INTO systems (session_id, digest, token_pos) "
                        "VALUES (?,?,?)",
                        [sid, text_digest(it.text), pos],
                    )
        return out

    @staticmethod
    def _append(session: Session, item: Item) -> None:
        append_split(session, item.role, item.text, item.metadata)

    # ---- history side ---------------------------------------------------------------------
    def add(self, session_id: str, items: list[Item]) -> list[Item]:
        """Append messages given by a history/memory object; returns those ingested.

        Messages the chat model already ingested in its last turn (the framework hands
        the same input and reply to its history afterwards) are recognised and skipped.
        """
        with self.lock(session_id):
            session = self.engine.session(session_id)
            row = self._conn.execute(
                "SELECT digest, n, prev, unclaimed FROM heads WHERE session_id = ?",
                [session_id],
            ).fetchone()
            head, n, prev, unclaimed = row if row else ("", 0, "", 0)
            row = self._conn.execute(
                "SELECT base, digests FROM pending WHERE session_id = ?", [session_id]
            ).fetchone()
            cursor, pend = (row[0], json.loads(row[1])) if row else ("", [])
            out = []
            for it in items:
                if not it.text.strip():
                    continue
                if it.role == "system" and self._known_system(session_id, it):
                    continue
                if it.role != "system" and pend:
                    d = digest(cursor, it)
                    if d == pend[0]:  # the model ingested (or wrote) this one already
                        cursor, pend = d, pend[1:]
                        if not pend:
                            unclaimed = 0
                        continue
                    if it.role == "assistant" and unclaimed:  # our reply, reformatted
                        pend, unclaimed = [], 0
                        continue
                    pend = []
                self._append(session, it)
                out.append(it)
                unclaimed = 0
                if it.role != "system":
                    head, n, prev = digest(head, it), n + 1, ""
            with self._tx() as c:
                c.execute(
                    "INSERT OR REPLACE INTO heads (session_id, digest, n, updated, prev, "
                    "unclaimed) VALUES (?,?,?,?,?,?)",
                    [session_id, head, n, time.time(), prev, unclaimed],
                )
                c.execute(
                    "INSERT OR REPLACE INTO pending (session_id, base, digests) VALUES (?,?,?)",
                    [session_id, cursor, json.dumps(pend)],
                )
            return out

    def _known_system(self, session_id: str, item: Item) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM systems WHERE session_id = ? AND digest = ?",
            [session_id, text_digest(item.text)],
        ).fetchone()
        return row is not None


def append_split(session: Session, role: str, text: str, metadata: dict) -> None:
    """Append a message, splitting one longer than the working budget into parts."""
    limit = session.config.working_budget // 2
    base = session.engine.base
    ids = base.encode(text)
    if len(ids) <= limit:
        session.append(role, text, metadata)
        return
    parts = [base.decode(ids[i : i + limit]) for i in range(0, len(ids), limit)]
    for j, part in enumerate(parts):
        meta = dict(metadata) if j == 0 else {ORIGIN: "continuation"}
        if part.strip():
            session.append(role, part, meta)


def merged_messages(session: Session) -> list:
    """The session's log with split messages joined again: [(role, content, metadata)]."""
    out: list[list] = []
    for m in session.messages():
        meta = m.metadata or {}
        if meta.get(ORIGIN) == "continuation" and out:
            out[-1][1] += m.content
            continue
        out.append([m.role, m.content, meta])
    return out


_ENGINES: dict[tuple, MegaContextEngine] = {}
_ROUTERS: dict[tuple, Router] = {}
_LOCK = threading.Lock()


def get_engine(store, working_budget: int, model: str, device, overrides: dict):
    """One engine per (store, settings) in a process; they share the loaded model."""
    key = (
        str(Path(store).resolve()),
        working_budget,
        model,
        device,
        json.dumps(overrides, sort_keys=True, default=str),
    )
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = MegaContextEngine(
                store=store, working_budget=working_budget, model=model, device=device, **overrides
            )
        return _ENGINES[key]


def get_router(engine: MegaContextEngine, name: str, id_prefix: str) -> Router:
    key = (id(engine), name)
    with _LOCK:
        if key not in _ROUTERS:
            _ROUTERS[key] = Router(engine, name, id_prefix)
        return _ROUTERS[key]


def router_for(settings, name: str, id_prefix: str) -> Router:
    """The shared router of an adapter whose fields name its engine (`store`,
    `working_budget`, `model`, `device`, `engine_kwargs`); the engine loads on first use."""
    engine = get_engine(
        settings.store,
        settings.working_budget,
        settings.model,
        settings.device,
        settings.engine_kwargs,
    )
    return get_router(engine, name, id_prefix)
