"""`megacontext fsck`: check a store's index and payload files; optionally repair.

Checks: the index opens and passes SQLite's integrity check; every session has its folder;
every payload file has the header its session implies and at least its committed extent;
message sequence numbers and token ranges are contiguous and agree with the level counts;
each gist level holds at most one gist per 32 children below it (fewer while gists wait to
be made: a note, not a fault); gist files belong to the session's GistNet version. Faults name the file. Harmless leftovers of a crash (bytes past a committed
extent, folders or files that hold nothing committed) are reported as notes, not faults.

`--repair` restores the last committed state: it cuts torn tails, removes leftovers and
rewrites damaged headers (a header is fully determined by its session). Lost gists are
dropped and the session is marked for re-gisting (the next open, or `megacontext reindex`,
rebuilds them from the tokens). Lost tokens can only come back from the message log:
`--repair` reports them, and `megacontext export` then `import` rebuilds the session.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .payload import HEADER_SIZE, PayloadError
from .sqlite import (
    NEEDS_REGIST,
    SESSION_TABLES,
    SessionStore,
    Store,
    StoreError,
    decode_id,
    file_level,
)


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    sessions: int = 0

    @property
    def clean(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        out = [f"ERROR {e}" for e in self.errors]
        out += [f"note  {n}" for n in self.notes]
        out += [f"fixed {r}" for r in self.repaired]
        status = "clean" if self.clean else f"{len(self.errors)} error(s)"
        out.append(f"{self.sessions} session(s) checked: {status}")
        return out


def fsck(path: str | os.PathLike, repair: bool = False, gist_version: str | None = None) -> Report:
    """Check (and with `repair`, fix) the store at `path`."""
    rep = Report()
    root = Path(path)
    db_path = root / "index.db"
    if not root.is_dir():
        rep.errors.append(f"{root}: store folder does not exist")
        return rep
    if not db_path.exists():
        folders = sorted(p.name for p in (root / "sessions").glob("*")) if root.is_dir() else []
        if folders:
            rep.errors.append(
                f"{db_path}: index missing; {len(folders)} session folder(s) have no index "
                "(the message log lived in it and cannot be rebuilt from payloads)"
            )
        else:
            rep.notes.append(f"{db_path}: no index yet (empty store)")
        return rep
    try:
        store = Store(root)
        bad = [r[0] for r in store.db.conn.execute("PRAGMA integrity_check").fetchall()]
    except (StoreError, sqlite3.DatabaseError) as e:
        rep.errors.append(f"{db_path}: cannot open the index: {e}")
        return rep
    if bad != ["ok"]:
        rep.errors.append(f"{db_path}: SQLite integrity check failed: {'; '.join(bad[:5])}")
        return rep
    rows = store.query("SELECT * FROM sessions ORDER BY rowid")
    keys = {r["key"] for r in rows}
    for r in store.query(" UNION ".join(f"SELECT session_key FROM {t}" for t in SESSION_TABLES)):
        if r["session_key"] not in keys:
            rep.errors.append(f"{db_path}: rows of unknown session key {r['session_key']}")
            if repair:
                with store._write() as conn:
                    for t in SESSION_TABLES:
                        conn.execute(f"DELETE FROM {t} WHERE session_key = ?", [r["session_key"]])
                rep.repaired.append(
                    f"{db_path}: removed rows of unknown session {r['session_key']}"
                )
                rep.errors.pop()
    for r in [r for r in rows if r["staging"]]:
        rows.remove(r)
        rep.notes.append(
            f"{db_path}: session {decode_id(r['id'])!r} is an import that never finished "
            "(the session it was to replace is untouched)"
        )
        if repair:
            with store.lock(r["key"]), store._write() as conn:
                for t in (*SESSION_TABLES, "sessions"):
                    column = "key" if t == "sessions" else "session_key"
                    conn.execute(f"DELETE FROM {t} WHERE {column} = ?", [r["key"]])
            rep.repaired.append(f"{db_path}: unfinished import {decode_id(r['id'])!r} removed")
    folders = {r["folder"] or r["key"] for r in rows}
    for folder in sorted(store.sessions_dir.iterdir()):
        if folder.name not in folders:
            rep.notes.append(
                f"{folder}: folder of no session (left by an interrupted create/delete)"
            )
            if repair:
                _remove(folder)
                rep.repaired.append(f"{folder}: removed")
    for row in rows:
        rep.sessions += 1
        s = SessionStore(store, row)
        with s.lock():
            _check_session(store, s, row, rep, repair, gist_version)
    return rep


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


def _check_session(store, s: SessionStore, row, rep: Report, repair: bool, want_version) -> None:
    sid = decode_id(row["id"])
    name = f"session {sid!r} ({s.dir})"
    version = row["gist_version"]
    counts = s.counts()
    faults: list[tuple[str, str]] = []  # (kind, message); kind: index | tokens | gists
    msgs = store.query(
        "SELECT seq, token_start, token_end FROM messages WHERE session_key = ? ORDER BY seq",
        [s.key],
    )
    # ---- the index agrees with itself ------------------------------------------------
    expect_start = 0
    for i, m in enumerate(msgs):
        if m["seq"] != i or m["token_start"] != expect_start or m["token_end"] < m["token_start"]:
            faults.append(("index", f"{store.db_path}: {name}: message log broken at seq {i}"))
            break
        expect_start = m["token_end"]
    n0 = counts.get(0, 0)
    if len(msgs) != row["n_messages"] or expect_start != n0 or row["n_tokens"] != n0:
        faults.append(
            (
                "index",
                f"{store.db_path}: {name}: counts disagree: {len(msgs)} messages (row says "
                f"{row['n_messages']}), message tokens end at {expect_start}, level 0 holds "
                f"{n0}, row says {row['n_tokens']}",
            )
        )
    if version == NEEDS_REGIST:
        rep.notes.append(f"{name}: gists dropped by a repair; rebuilt on next open or reindex")
    else:
        level, children, pending = 1, n0, 0
        while children >= s.block_size or counts.get(level, 0):
            have, most = counts.get(level, 0), children // s.block_size
            if have > most:
                faults.append(
                    (
                        "gists",
                        f"{store.db_path}: {name}: level {level} holds {have} gists, at most "
                        f"{most} expected",
                    )
                )
                break
            pending += most - have
            level, children = level + 1, most
        if pending:
            rep.notes.append(
                f"{name}: {pending} gist(s) not made yet (appends return before gisting); "
                "made on the next open or turn, or now by `megacontext reindex`"
            )
        if want_version and version != want_version:
            rep.notes.append(f"{name}: gists of GistNet {version!r}, current is {want_version!r}")
    # ---- the files ------------------------------------------------------------------
    if not s.dir.is_dir():
        if counts:
            faults.append(("tokens", f"{s.dir}: folder missing for {name}, {n0} tokens committed"))
        elif repair:
            s.dir.mkdir()
            rep.repaired.append(f"{s.dir}: recreated (empty session)")
    else:
        _check_files(s, version, counts, faults, rep, repair)
    kinds = {k for k, _ in faults}
    if repair and kinds == {"gists"}:
        _drop_gists(store, s)
        rep.repaired.append(
            f"{s.dir}: {len(faults)} gist fault(s): gists dropped; they are rebuilt from the "
            "tokens on next open or by `megacontext reindex`"
        )
        return
    rep.errors.extend(msg for _, msg in faults)
    if "tokens" in kinds:
        rep.errors.append(
            f"{name}: committed tokens are lost; rebuild the session from its message log "
            f"(`megacontext export --store {store.path} --session ID -o FILE`, "
            "`megacontext import --replace ...`)"
        )


def _check_files(s: SessionStore, version, counts, faults, rep: Report, repair: bool) -> None:
    expected = {"L0.bin": 0} | {s.payload(lv, version).path.name: lv for lv in counts if lv}
    for entry in sorted(os.listdir(s.dir)):
        if entry in expected:
            continue
        path = s.dir / entry
        parsed = file_level(entry)
        what = (
            f"gists of GistNet {parsed[1]!r}, not the session's {version!r}"
            if parsed and parsed[1] and parsed[1] != version
            else "holds nothing committed"
        )
        rep.notes.append(f"{path}: {what} (left by an interrupted write)")
        if repair:
            _remove(path)
            rep.repaired.append(f"{path}: removed")
    for lv in sorted(expected.values()):
        f = s.payload(lv, version)
        kind = "tokens" if lv == 0 else "gists"
        committed = counts.get(lv, 0)
        if not f.path.exists():
            if committed:
                faults.append((kind, f"{f.path}: missing, but {committed} records are committed"))
            elif repair:
                f.open_at(0)
                rep.repaired.append(f"{f.path}: created (empty)")
            continue
        try:
            f.check_header()
        except PayloadError as e:
            if repair:
                f.rewrite_header()
                rep.repaired.append(f"{e}: header rewritten")
            else:
                faults.append((kind, str(e)))
        size = f.path.stat().st_size
        want = HEADER_SIZE + committed * f.record_size
        if size < want:
            faults.append(
                (
                    kind,
                    f"{f.path}: truncated: {size} bytes, committed extent needs {want} "
                    f"({committed} records of {f.record_size} bytes)",
                )
            )
        elif size > want:
            rep.notes.append(
                f"{f.path}: {size - want} bytes past the committed extent (torn write)"
            )
            if repair:
                f.open_at(committed)
                rep.repaired.append(f"{f.path}: cut to {want} bytes")


def _drop_gists(store: Store, s: SessionStore) -> None:
    with store._write() as conn:
        conn.execute("DELETE FROM levels WHERE session_key = ? AND level > 0", [s.key])
        conn.execute("DELETE FROM refined_gists WHERE session_key = ?", [s.key])
        conn.execute("UPDATE sessions SET gist_version = ? WHERE key = ?", [NEEDS_REGIST, s.key])
    s.prepare()


# ---- command line -----------------------------------------------------------------------
def fsck_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext fsck",
        description="Check a MegaContext store: index, payload headers, sizes, counts and "
        "gist versions. Exit status 0 when clean (notes allowed), 1 when faults remain.",
    )
    p.add_argument("--store", required=True, help="path of the store folder (holds index.db)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="restore the last committed state: cut torn writes, remove leftovers, rewrite "
        "damaged headers, drop damaged gists for re-gisting",
    )
    p.add_argument(
        "--gist-version",
        default=None,
        help="also note sessions whose gists were made by another GistNet version",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only faults and the summary")
    return p


def fsck_main(argv: list[str] | None = None) -> int:
    args = fsck_parser().parse_args(argv)
    rep = fsck(args.store, repair=args.repair, gist_version=args.gist_version)
    for line in rep.lines():
        if args.quiet and line.startswith("note"):
            continue
        print(line, file=sys.stderr if line.startswith("ERROR") else sys.stdout)
    return 0 if rep.clean else 1
