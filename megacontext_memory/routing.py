"""Session routing shared by the framework adapters (no framework imports here).

Frameworks call a chat model with the conversation every turn (LangGraph state,
RunnableWithMessageHistory, a plain list, a trimmed window of it). The router maps that
list onto one engine session and ingests only the messages the session does not hold.

Isolation comes first. A session is *named* by whoever owns the conversation (a memory or
history object, `configurable.session_id` / `thread_id`, an explicit `session_id`);
content matching only ever continues *automatic* sessions, the ones the router started
itself for unnamed calls, never a named one. System and tool texts are part of what
identifies an automatic conversation, and a tie between candidates starts a new session.

Matching. Each session keeps the digests of its newest chained (non-system) messages, its
*tail*. A list continues the session after the latest of its messages that is the
session's newest message (or, where the framework resends our last reply reformatted, an
assistant message in its place after the message before it):

- named sessions: the message before that point must agree too; earlier messages are not
  compared, so a window (`trim_messages`, summarising middleware) and a full list continue
  alike, and a list holding only the new turn is ingested whole. The rule for edits: the
  log is append-only, so an edited or deleted message earlier than the session's last two
  is neither applied nor re-ingested; the list's messages after the matched point are.
- automatic sessions: every message the list shares with the stored tail must agree, and
  the system/tool texts must be the same; anything else is another conversation (a
  regenerate or an edit forks into a new session rather than corrupting the old one).

System messages are not chained. Per session the newest text of each system slot (the
prompt's first, second ... system message, the tool list) is the one that steers: a slot
whose text changed is ingested again, an unchanged one never (it is stored once), and the
engine keeps the newest message of each slot raw (metadata "slot"; see `Session._pins`).

Turns hold a per-session lock across threads and processes (`turns.turn_lock`) from the
routing decision to the stored reply. `ephemeral` turns run in a throwaway session that is
deleted afterwards; `gc()` removes automatic sessions nobody has used for a while.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .engine import MegaContextEngine, Session, split_text
from .turns import turn_lock

ORIGIN = "mc_origin"  # metadata key saying who ingested a message and why
TAIL = 64  # newest message digests kept per session
ROUTES = "{name}-sessions.db"


@dataclass(frozen=True)
class Item:
    """One framework message in the engine's terms."""

    role: str  # system | user | assistant | tool
    text: str  # exactly what is ingested (tool calls rendered into it)
    metadata: dict = field(default_factory=dict, compare=False)
    slot: str = field(default="", compare=False)  # system messages: which prompt slot


def digest(prev: str, item: Item) -> str:
    """Chained digest: `prev` is the digest of everything before `item`."""
    h = hashlib.sha256(f"{prev}\x1f{item.role}\x1f{item.text}".encode())
    return h.hexdigest()[:32]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def item_digest(item: Item) -> str:
    return digest("", item)


def context_digest(systems: Sequence[Item]) -> str:
    """What identifies an automatic conversation besides its messages."""
    return text_digest("\x1e".join(f"{it.slot}\x1f{it.text}" for it in systems))


SCHEMA = """
CREATE TABLE IF NOT EXISTS routes (
    session_id TEXT PRIMARY KEY,
    auto INTEGER NOT NULL,             -- started by the router for an unnamed call
    ephemeral INTEGER NOT NULL DEFAULT 0,
    ctx TEXT NOT NULL DEFAULT '',      -- system/tool texts of an automatic session
    head TEXT NOT NULL DEFAULT '',     -- chained digest of every chained message
    last TEXT NOT NULL DEFAULT '',     -- digest of the newest chained message
    prev TEXT NOT NULL DEFAULT '',     -- digest of the one before it
    tail TEXT NOT NULL DEFAULT '[]',   -- digests of the newest chained messages
    n INTEGER NOT NULL DEFAULT 0,      -- chained messages in the session
    replied INTEGER NOT NULL DEFAULT 0,  -- the newest message is a reply we generated
    pending TEXT NOT NULL DEFAULT '[]',  -- [digest, generated] the model ingested or wrote
                                         -- since a history last added
    created REAL NOT NULL,
    updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS routes_head ON routes(head);
CREATE INDEX IF NOT EXISTS routes_last ON routes(last);
CREATE INDEX IF NOT EXISTS routes_prev ON routes(prev);
CREATE TABLE IF NOT EXISTS systems (session_id TEXT NOT NULL, slot TEXT NOT NULL,
                                    digest TEXT NOT NULL, token_pos INTEGER NOT NULL,
                                    PRIMARY KEY (session_id, slot));
"""


@dataclass
class Route:
    """A session's routing row (a fresh session has the defaults)."""

    session_id: str
    auto: bool = False
    ephemeral: bool = False
    ctx: str = ""
    head: str = ""
    last: str = ""
    tail: list[str] = field(default_factory=list)
    n: int = 0
    replied: bool = False
    pending: list[list] = field(default_factory=list)
    created: float = 0.0

    def push(self, item: Item) -> None:
        d = item_digest(item)
        self.head, self.last, self.n = digest(self.head, item), d, self.n + 1
        self.tail = [*self.tail, d][-TAIL:]


def match(route: Route, items: Sequence[Item], strict: bool) -> int:
    """How many of `items` (chained messages) the session already holds; 0: none.

    The largest k such that items[k-1] is the session's newest message (or an assistant
    message standing for our reformatted reply) and the messages before it agree with the
    tail: all that overlap it (`strict`), or the one before it.
    """
    tail = route.tail
    if not tail:
        return 0
    ids = [item_digest(it) for it in items]
    for k in range(len(ids), 0, -1):
        exact = ids[k - 1] == tail[-1]
        reformatted = (
            not exact
            and route.replied
            and items[k - 1].role == "assistant"
            and k >= 2
            and len(tail) >= 2
            and ids[k - 2] == tail[-2]
        )
        if not (exact or reformatted):
            continue
        m = min(k, len(tail))
        before, want = ids[k - m : k - 1], tail[-m:-1]
        if (before == want) if strict else (before[-1:] == want[-1:]):
            return k
    return 0


@dataclass
class Turn:
    """A routed call: the session, what was ingested, and the head before the reply."""

    router: Router
    session: Session
    route: Route
    ingested: list[Item]

    @property
    def session_id(self) -> str:
        return self.session.id

    @property
    def head(self) -> str:
        """Chained digest of the session before the reply (tool-call ids derive from it)."""
        return self.route.head

    def commit_reply(self, item: Item | None) -> None:
        """Record the reply the engine appended (None or empty: nothing to chain)."""
        if item is not None and item.text.strip():
            self.route.push(item)
            self.route.pending = [*self.route.pending, [self.route.last, True]][-TAIL:]
            self.route.replied = True
        self.router._save(self.route)


class Router:
    """Maps framework message lists onto engine sessions (one per store and framework)."""

    def __init__(self, engine: MegaContextEngine, name: str, id_prefix: str):
        self.engine = engine
        self.path = Path(engine.store.path) / ROUTES.format(name=name)
        self.id_prefix = id_prefix
        self._local = threading.local()
        self._conn.executescript(SCHEMA)

    # ---- sqlite -------------------------------------------------------------------------
    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    def lock(self, session_id: str):
        """The session's turn lock (threads and processes; nests within a thread)."""
        return turn_lock(self.engine.store.path, session_id)

    def route(self, session_id: str) -> Route:
        """The session's routing row; for a session the router has not seen (made by the
        engine directly, or by an older version), one rebuilt from its log."""
        row = self._conn.execute(
            "SELECT auto, ephemeral, ctx, head, last, tail, n, replied, pending, created "
            "FROM routes WHERE session_id = ?",
            [session_id],
        ).fetchone()
        if row is None:
            route = Route(session_id, created=time.time())
            if self.engine.store.has_session(session_id):
                for role, content, _ in merged_messages(self.engine.session(session_id)):
                    if role != "system":
                        route.push(Item(role, content))
            return route
        auto, eph, ctx, head, last, tail, n, replied, pending, created = row
        return Route(
            session_id,
            bool(auto),
            bool(eph),
            ctx,
            head,
            last,
            json.loads(tail),
            n,
            bool(replied),
            json.loads(pending),
            created,
        )

    def _save(self, r: Route) -> None:
        with _tx(self._conn) as c:
            c.execute(
                "INSERT OR REPLACE INTO routes (session_id, auto, ephemeral, ctx, head, last, "
                "prev, tail, n, replied, pending, created, updated) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    r.session_id,
                    int(r.auto),
                    int(r.ephemeral),
                    r.ctx,
                    r.head,
                    r.last,
                    r.tail[-2] if len(r.tail) >= 2 else "",
                    json.dumps(r.tail),
                    r.n,
                    int(r.replied),
                    json.dumps(r.pending),
                    r.created,
                    time.time(),
                ],
            )

    def forget(self, session_id: str) -> None:
        with _tx(self._conn) as c:
            for table in ("routes", "systems"):
                c.execute(f"DELETE FROM {table} WHERE session_id = ?", [session_id])

    # ---- routing ------------------------------------------------------------------------
    def find(self, items: Sequence[Item], systems: Sequence[Item] = ()) -> tuple[Route, int]:
        """The automatic session an unnamed call continues and how many of its chained
        `items` it holds; a new automatic session (k = 0) when none or several fit."""
        chained = [it for it in items if it.role != "system"]
        ctx = context_digest(systems)
        heads, lasts, prev = [], [], ""
        for it in chained:
            prev = digest(prev, it)
            heads.append(prev)
            lasts.append(item_digest(it))
        found: list[tuple[int, bool, Route]] = []
        if chained:
            marks = ",".join("?" * len(chained))
            rows = self._conn.execute(
                f"SELECT session_id FROM routes WHERE auto = 1 AND ephemeral = 0 AND ctx = ? "
                f"AND (head IN ({marks}) OR last IN ({marks}) OR (replied = 1 AND prev IN ({marks})))",
                [ctx, *heads, *lasts, *lasts],
            ).fetchall()
            for (sid,) in rows:
                r = self.route(sid)
                k = match(r, chained, strict=True)
                if k and self.engine.store.has_session(sid):
                    found.append((k, r.n == k and r.head == heads[k - 1], r))
        exact = [f for f in found if f[1]]
        found = exact or found
        if found:
            best = max(k for k, _, _ in found)
            top = [f for f in found if f[0] == best]
            if len(top) == 1:  # a tie: two conversations we cannot tell apart
                return top[0][2], best
        sid = f"{self.id_prefix}{uuid.uuid4().hex[:16]}"
        return Route(sid, auto=True, ctx=ctx, created=time.time()), 0

    @contextlib.contextmanager
    def turn(
        self,
        items: list[Item],
        session_id: str | None = None,
        extra_systems: Sequence[Item] = (),
        system_refresh_tokens: int | None = None,
        ephemeral: bool = False,
    ) -> Iterator[Turn]:
        """Route `items`, ingest what is new, and hold the session until the reply is in.

        `session_id` names the session; without it the call continues an automatic
        session it matches, or starts one (a throwaway one when `ephemeral`)."""
        systems = _slotted([it for it in items if it.role == "system"], list(extra_systems))
        chained = [it for it in items if it.role != "system"]
        with contextlib.ExitStack() as stack:
            if session_id is not None:
                stack.enter_context(self.lock(session_id))
                route = self.route(session_id)
                chained = _collapse(chained, route)
                k = match(route, chained, strict=False)
            elif ephemeral:
                sid = f"{self.id_prefix}tmp-{uuid.uuid4().hex[:16]}"
                route = Route(sid, auto=True, ephemeral=True, created=time.time())
                stack.enter_context(self.lock(sid))
                stack.callback(self.discard, sid)
                k = 0
            else:
                route, k = self._claim(stack, chained, systems)
            session = self.engine.session(route.session_id)
            ingested = self._ingest_systems(
                route.session_id, session, systems, system_refresh_tokens
            )
            batch: list[dict] = []
            for it in chained[k:]:
                batch += split_parts(session, it.role, it.text, it.metadata)
                route.push(it)
                route.pending = [*route.pending, [route.last, False]][-TAIL:]
                ingested.append(it)
            session.extend(batch)
            route.replied = route.replied and k == len(chained)
            self._save(route)
            yield Turn(self, session, route, ingested)

    def _claim(self, stack: contextlib.ExitStack, chained, systems) -> tuple[Route, int]:
        """Find and lock an automatic session; retry if another turn moved it meanwhile."""
        for _ in range(3):
            route, k = self.find(chained, systems)
            lock = stack.enter_context(contextlib.ExitStack())
            lock.enter_context(self.lock(route.session_id))
            if k == 0 or self.route(route.session_id) == route:
                return route, k
            lock.close()
        route = Route(f"{self.id_prefix}{uuid.uuid4().hex[:16]}", auto=True, created=time.time())
        route.ctx = context_digest(systems)
        stack.enter_context(self.lock(route.session_id))
        return route, 0

    def _ingest_systems(self, sid, session, systems, refresh) -> list[Item]:
        """Ingest each system slot whose text is new to the session (the newest steers)."""
        out = []
        pos = session.token_count()
        for it in systems:
            d = text_digest(it.text)
            row = self._conn.execute(
                "SELECT digest, token_pos FROM systems WHERE session_id = ? AND slot = ?",
                [sid, it.slot],
            ).fetchone()
            if row is not None and row[0] == d and (refresh is None or pos - row[1] <= refresh):
                continue
            append_split(session, it.role, it.text, {**it.metadata, "slot": it.slot})
            out.append(it)
            with _tx(self._conn) as c:
                c.execute(
                    "INSERT OR REPLACE INTO systems (session_id, slot, digest, token_pos) "
                    "VALUES (?,?,?,?)",
                    [sid, it.slot, d, session.token_count()],
                )
        return out

    def discard(self, session_id: str) -> None:
        """Delete a session and its routing state (under its turn lock)."""
        with self.lock(session_id):
            self.engine.delete_session(session_id)
            self.forget(session_id)

    # ---- history side ---------------------------------------------------------------------
    def add(self, session_id: str, items: Sequence[Item]) -> list[Item]:
        """Append messages given by a history/memory object; returns those ingested.

        Messages the chat model ingested or wrote since a history last added (the framework
        hands the same inputs and replies to its history afterwards, our replies possibly
        reformatted) are recognised in order and skipped, as is a system text the session
        already holds in any slot.
        """
        with self.lock(session_id):
            session = self.engine.session(session_id)
            route = self.route(session_id)
            current = {
                d
                for (d,) in self._conn.execute(
                    "SELECT digest FROM systems WHERE session_id = ?", [session_id]
                )
            }
            pending, out = list(route.pending), []
            batch: list[dict] = []  # every new message, stored in one `extend`
            new_systems: list[tuple[int, str]] = []  # (its last part in `batch`, digest)
            for it in items:
                if not it.text.strip():
                    continue
                if it.role == "system":
                    d = text_digest(it.text)
                    if d in current:
                        continue
                    meta = {**it.metadata, "slot": "history"}  # the newest one steers
                    batch += split_parts(session, it.role, it.text, meta)
                    new_systems.append((len(batch) - 1, d))
                    current.add(d)
                    out.append(it)
                    continue
                if pending:
                    d, generated = pending[0]
                    if item_digest(it) == d or (generated and it.role == "assistant"):
                        pending.pop(0)  # the model ingested or wrote it (maybe reformatted)
                        continue
                    pending = []
                batch += split_parts(session, it.role, it.text, it.metadata)
                route.push(it)
                route.replied = False
                out.append(it)
            stored = session.extend(batch)
            with _tx(self._conn) as c:
                for i, d in new_systems:
                    c.execute(
                        "INSERT OR REPLACE INTO systems (session_id, slot, digest, token_pos)"
                        " VALUES (?,?,?,?)",
                        [session_id, f"history-{d}", d, stored[i].token_end],
                    )
            route.pending = pending
            self._save(route)
            return out

    def extend(self, session_id: str, items: Sequence[Item]) -> list[Item] | None:
        """Append the part of `items` the session does not hold yet, if the list continues
        the session (it holds the session's newest messages, or the session is empty);
        None, storing nothing, when it does not."""
        with self.lock(session_id):
            route = self.route(session_id)
            chained = [it for it in items if it.role != "system" and it.text.strip()]
            k = match(route, chained, strict=True)
            if route.n and not k:
                return None
            route.pending = []
            self._save(route)
            return self.add(session_id, [it for it in items if it.role == "system"] + chained[k:])


def _collapse(items: list[Item], route: Route) -> list[Item]:
    """Drop the second of two adjacent copies of a reply we wrote: a memory read after the
    turn shows the reply, and the framework adds its own copy (agents' scratchpads)."""
    ours = {d for d, generated in route.pending if generated}
    out, prev = [], None
    for it in items:
        d = item_digest(it)
        if not (d == prev and d in ours):
            out.append(it)
        prev = d
    return out


def _slotted(prompt: list[Item], extra: list[Item]) -> list[Item]:
    """System items with their slots: the prompt's n-th system message, then extras'."""
    out = [Item(it.role, it.text, it.metadata, f"prompt-{i}") for i, it in enumerate(prompt)]
    out += [
        Item(it.role, it.text, it.metadata, it.slot or f"extra-{i}") for i, it in enumerate(extra)
    ]
    return [it for it in out if it.text.strip()]


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=120, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=120000")
    return conn


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def append_split(session: Session, role: str, text: str, metadata: dict) -> None:
    """Append a message, splitting one longer than the working budget into parts."""
    session.extend(split_parts(session, role, text, metadata))


def split_parts(session: Session, role: str, text: str, metadata: dict) -> list[dict]:
    """A message as the parts `append_split` stores (one unless it is over half the
    working budget); later parts are marked as continuations."""
    parts = split_text(session.engine.base, text, session.config.working_budget // 2)
    return [
        {
            "role": role,
            "content": part,
            "metadata": dict(metadata) if j == 0 else {ORIGIN: "continuation"},
        }
        for j, part in enumerate(parts)
    ]


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


# ---- garbage collection ----------------------------------------------------------------------
def parse_age(text: str) -> float:
    """Seconds in "90", "90s", "15m", "12h" or "7d"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if m is None:
        raise ValueError(f"bad age {text!r}: use e.g. 3600, 90m, 12h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def gc(store: str | Path, older_than: float, dry_run: bool = False) -> list[str]:
    """Delete automatic sessions (started for unnamed calls, never named by an owner) and
    leftover ephemeral ones that no call has used for `older_than` seconds; returns their
    ids. Named sessions are never touched. Loads no model."""
    from .store import Store

    root, cutoff, removed = Path(store), time.time() - older_than, []
    if not root.is_dir():
        raise FileNotFoundError(f"no store at {root}")
    opened: Store | None = None
    for path in sorted(root.glob(ROUTES.format(name="*"))):
        conn = _connect(path)
        try:
            rows = conn.execute(
                "SELECT session_id FROM routes WHERE auto = 1 AND updated < ?", [cutoff]
            ).fetchall()
            for (sid,) in rows:
                with turn_lock(root, sid):
                    row = conn.execute(
                        "SELECT updated FROM routes WHERE session_id = ?", [sid]
                    ).fetchone()
                    if row is None or row[0] >= cutoff:
                        continue  # used meanwhile
                    removed.append(sid)
                    if dry_run:
                        continue
                    opened = opened or Store(root)
                    opened.delete_session(sid)
                    with _tx(conn) as c:
                        for table in ("routes", "systems"):
                            c.execute(f"DELETE FROM {table} WHERE session_id = ?", [sid])
        finally:
            conn.close()
    return removed


def gc_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="megacontext gc",
        description="Remove automatic adapter sessions (calls that named no session) unused "
        "for longer than an age. Sessions named by an owner are kept.",
    )
    ap.add_argument("--store", required=True, help="store directory")
    ap.add_argument("--older-than", required=True, help="age: seconds, or 90m, 12h, 7d")
    ap.add_argument("--dry-run", action="store_true", help="list, delete nothing")
    args = ap.parse_args(argv)
    try:
        removed = gc(args.store, parse_age(args.older_than), args.dry_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"megacontext gc: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"removed": removed, "dry_run": args.dry_run}))
    return 0
