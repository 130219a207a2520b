"""Routing rules, turn locks and gc, without a model."""

import multiprocessing as mp
import time

from megacontext_memory import routing
from megacontext_memory.routing import Item, Route, gc, match, parse_age
from megacontext_memory.store import Store
from megacontext_memory.turns import turn_lock


def _route(*items, replied=False):
    r = Route("s")
    for it in items:
        r.push(it)
    r.replied = replied
    return r


U1, A1, U2, A2, U3 = (
    Item("user", "hi"),
    Item("assistant", "hello"),
    Item("user", "how are you"),
    Item("assistant", "fine"),
    Item("user", "bye"),
)


def test_full_list_window_and_new_turn_only():
    r = _route(U1, A1, U2, A2)
    assert match(r, [U1, A1, U2, A2, U3], strict=True) == 4  # the whole list
    assert match(r, [U2, A2, U3], strict=True) == 2  # a trimmed window
    assert match(r, [U3], strict=False) == 0  # only the new turn: all of it is new
    assert match(r, [U1, A1, U2], strict=True) == 0  # an older point: not this conversation


def test_edited_earlier_message_rule():
    r = _route(U1, A1, U2, A2)
    edited = [Item("user", "HI!"), A1, U2, A2, U3]
    assert match(r, edited, strict=False) == 4  # named: neither applied nor re-ingested
    assert match(r, edited, strict=True) == 0  # automatic: another conversation


def test_reformatted_reply_counts_as_ours():
    r = _route(U1, A1, U2, A2, replied=True)
    assert match(r, [U1, A1, U2, Item("assistant", "Thought: fine"), U3], strict=True) == 4
    assert match(_route(U1, A1, U2, A2), [U2, Item("assistant", "x")], strict=True) == 0


def _hold(store, sid, ready, out):
    with turn_lock(store, sid):
        ready.set()
        time.sleep(1.0)
    out.put(time.monotonic())


def test_turn_lock_holds_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=_hold, args=(str(tmp_path), "alice", ready, out))
    p.start()
    assert ready.wait(60)
    with turn_lock(tmp_path, "bob"):  # another session is free
        pass
    with turn_lock(tmp_path, "alice"):  # the same session waits for the other process
        acquired = time.monotonic()
    released = out.get(timeout=60)
    p.join(60)
    assert acquired >= released - 0.05


def test_gc_removes_only_old_automatic_sessions(tmp_path):
    store = Store(tmp_path)
    for sid in ("lc-auto-old", "lc-auto-new", "named-old"):
        store.session(
            sid, model="m", width=8, block_size=32, gist_dtype="float16", gist_version="v"
        )
    conn = routing._connect(tmp_path / routing.ROUTES.format(name="langchain"))
    conn.executescript(routing.SCHEMA)
    now = time.time()
    for sid, auto, age in (
        ("lc-auto-old", 1, 7200),
        ("lc-auto-new", 1, 10),
        ("named-old", 0, 7200),
    ):
        conn.execute(
            "INSERT INTO routes (session_id, auto, created, updated) VALUES (?,?,?,?)",
            [sid, auto, now - age, now - age],
        )
    assert gc(tmp_path, parse_age("1h"), dry_run=True) == ["lc-auto-old"]
    assert store.has_session("lc-auto-old")
    assert gc(tmp_path, parse_age("1h")) == ["lc-auto-old"]
    assert not store.has_session("lc-auto-old")
    assert store.has_session("lc-auto-new") and store.has_session("named-old")
    left = {r[0] for r in conn.execute("SELECT session_id FROM routes")}
    assert left == {"lc-auto-new", "named-old"}


def test_parse_age():
    assert [parse_age(a) for a in ("90", "15m", "12h", "7d")] == [90, 900, 43200, 604800]
