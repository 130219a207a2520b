"""Export, import and re-gisting of sessions (`megacontext export | import | reindex`).

Export format (JSONL, UTF-8): for each session, one header line
    {"format": "megacontext-session", "version": 1, "session": ID, "model": ..., ...}
followed by one line per message, oldest first:
    {"seq": 0, "role": "user", "content": "...", "metadata": {...}, "created": 1.7e9,
     "token_start": 0, "token_end": 12}
Only the message log travels: import re-tokenises every message and rebuilds the tree with
the importing engine's model and GistNet, then restores the original timestamps. It builds
under a temporary id and swaps the result in, so `--replace` never loses the original.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from tqdm import tqdm

from ..store import SessionStore, Store, StoreError

FORMAT = "megacontext-session"
IMPORT_CHUNK = 2048  # messages per commit: an interrupted import keeps whole chunks
FORMAT_VERSION = 1


def _dumps(obj: dict) -> str:
    try:
        text = json.dumps(obj, ensure_ascii=False, sort_keys=True)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # lone surrogates: escape them, the file stays valid UTF-8
        return json.dumps(obj, ensure_ascii=True, sort_keys=True)


def export_lines(ss: SessionStore, batch: int = 1000) -> Iterator[str]:
    """The JSONL lines (without newlines) of one session."""
    row = ss.row()
    yield _dumps(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "session": ss.id,
            "model": row["model"],
            "width": row["width"],
            "gist_version": row["gist_version"],
            "created": row["created"],
            "messages": row["n_messages"],
            "tokens": row["n_tokens"],
        }
    )
    start = 0
    while True:
        msgs = ss.messages(start, start + batch)
        for m in msgs:
            yield _dumps(m.to_dict())
        if len(msgs) < batch:
            return
        start += batch


def export_sessions(store: Store, out: IO[str], session_ids: Iterable[str] | None = None) -> int:
    """Write sessions (default: all) to `out`; returns the number of messages written."""
    n = 0
    for sid in store.sessions() if session_ids is None else session_ids:
        ss = store.open_session(sid)
        for i, line in enumerate(export_lines(ss)):
            out.write(line + "\n")
            n += i > 0
    return n


def read_export(lines: Iterable[str]) -> Iterator[tuple[dict, list[dict]]]:
    """(header, messages) per session of an export; raises ValueError on a malformed file."""
    header, msgs = None, []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {no}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"line {no}: expected a JSON object")
        if obj.get("format") == FORMAT:
            if obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"line {no}: export format version {obj.get('version')}")
            if header is not None:
                yield header, msgs
            header, msgs = obj, []
            continue
        if header is None:
            raise ValueError(f"line {no}: a message before any session header")
        role, content, meta = obj.get("role"), obj.get("content"), obj.get("metadata", {})
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"line {no}: a message needs string 'role' and 'content'")
        if not isinstance(meta, dict):
            raise ValueError(f"line {no}: 'metadata' must be an object")
        if "seq" in obj and obj["seq"] != len(msgs):
            raise ValueError(f"line {no}: seq {obj['seq']}, expected {len(msgs)}")
        msgs.append(obj)
    if header is not None:
        yield header, msgs


def import_session(
    engine,
    header: dict,
    msgs: list[dict],
    session_id=None,
    replace: bool = False,
    resume: bool = False,
    progress: bool = False,
    gist: bool = True,
):
    """Rebuild one exported session in `engine`'s store; returns the engine Session.

    Every message is checked before the store is touched (an error names its index). The
    session is built under a temporary id, not listed, then swapped in under its own id in
    one commit: a failure halfway leaves the store as it was, an existing session included.
    With `resume`, a session holding the first messages of `msgs` (an import interrupted
    after its swap, or a log that grew since) gets only the rest. With `gist`, the gists
    are made before returning (else on the session's next open).
    """
    from ..engine import validate_message
    from ..tree import MegaContextTree

    sid = header["session"] if session_id is None else session_id
    store = engine.store
    base, budget = engine.base, engine.config.working_budget
    for i, m in enumerate(msgs):
        try:
            validate_message(m.get("role"), m.get("content"), m.get("metadata") or {})
        except (TypeError, ValueError) as e:
            raise type(e)(f"message {i}: {e}") from None
    encoded = base.encode_messages([(m["role"], m["content"]) for m in msgs])
    for i, ids in enumerate(encoded):
        if len(ids) > budget:
            raise ValueError(
                f"message {i} is {len(ids)} tokens, longer than the working budget ({budget})"
            )
    held = store.open_session(sid).row()["n_messages"] if store.has_session(sid) else 0
    if held and resume:
        target = store.open_session(sid)
        start = _resume_point(target, msgs, sid)
    elif held and not replace:
        raise StoreError(f"session {sid!r} exists in {store.path}; pass --replace or --resume")
    else:
        start = 0
        target = store.session(
            f"{sid}\0import-{os.urandom(8).hex()}",
            model=base.name,
            width=base.width,
            block_size=engine.config.block_size,
            gist_dtype=engine.config.gist_dtype,
            gist_version=engine.gister.version,
            staging=True,
        )
    try:
        tree = MegaContextTree(target, engine.gister)
        total = sum(len(ids) for ids in encoded[start:])
        with tqdm(total=total, unit="tok", desc="import", disable=not progress) as bar:
            for lo in range(start, len(msgs), IMPORT_CHUNK):
                part = zip(
                    msgs[lo : lo + IMPORT_CHUNK], encoded[lo : lo + IMPORT_CHUNK], strict=True
                )
                chunk = [
                    (m["role"], m["content"], m.get("metadata") or {}, ids, m.get("created"))
                    for m, ids in part
                ]
                tree.extend(chunk)
                bar.update(sum(len(c[3]) for c in chunk))
        if target.id != sid:
            store.swap_in(target, sid)
    except BaseException:
        if target.id != sid:
            with contextlib.suppress(StoreError, OSError):
                store.delete_session(target.id)
        raise
    if gist:
        tree = MegaContextTree(store.open_session(sid), engine.gister)
        todo = (tree.n_tokens // 32 - tree.count(1)) * 32
        with tqdm(total=todo, unit="tok", desc="gisting", disable=not progress) as bar:
            tree.make_gists(bar.update)
    return engine.session(sid)


def _resume_point(target: SessionStore, msgs: list[dict], sid: str) -> int:
    """How many of `msgs` the session holds already; they must be its whole log."""
    stored = target.messages()
    if len(stored) > len(msgs):
        raise StoreError(
            f"session {sid!r} holds {len(stored)} messages, the file {len(msgs)}: not a "
            "resumable import (use --replace)"
        )
    for i, (have, want) in enumerate(zip(stored, msgs[: len(stored)], strict=True)):
        if (have.role, have.content, have.metadata) != (
            want["role"],
            want["content"],
            want.get("metadata") or {},
        ):
            raise StoreError(
                f"session {sid!r} differs from the file at message {i}: not a resumable "
                "import (use --replace)"
            )
    return len(stored)


def reindex(store: Store, gister, session_ids=None, force: bool = False) -> list[dict]:
    """Re-gist sessions (default: all) with `gister` now, not lazily on next open."""
    from ..tree import MegaContextTree

    out = []
    for sid in store.sessions() if session_ids is None else session_ids:
        ss = store.open_session(sid)
        row = ss.row()
        rec = {"session": sid, "from": row["gist_version"], "to": gister.version}
        if (ss.model, ss.width) != (gister.base.name, gister.base.width):
            rec["skipped"] = f"written with model {ss.model!r}, not {gister.base.name!r}"
            out.append(rec)
            continue
        t0 = time.perf_counter()
        if row["gist_version"] == gister.version and not force:
            rec["skipped"] = "already current"
        else:
            MegaContextTree(ss, gister, reindex=True).reindex(force=force)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        out.append(rec)
    return out


# ---- command line -----------------------------------------------------------------------
def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="path of the store folder")
    p.add_argument("--model", default="default", help="base model: 'default' or an HF id/path")
    p.add_argument("--device", default=None, help="torch device (default: CUDA if available)")
    p.add_argument(
        "--budget", type=int, default=1024, help="working budget of the engine (positions)"
    )
    p.add_argument(
        "--checkpoint",
        default="default",
        help="GistNet checkpoint path; 'default' = the shipped one, 'none' = untrained",
    )


def _engine(args):
    from ..engine import MegaContextEngine

    ckpt = None if args.checkpoint == "none" else args.checkpoint
    return MegaContextEngine(
        store=args.store,
        working_budget=args.budget,
        model=args.model,
        device=args.device,
        gist_checkpoint=ckpt,
    )


@contextlib.contextmanager
def _open_out(path: str):
    if path == "-":
        yield sys.stdout
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yield f
    tmp.replace(path)


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext export", description="Write sessions' message logs as JSONL."
    )
    p.add_argument("--store", required=True, help="path of the store folder")
    p.add_argument(
        "--session",
        action="append",
        default=None,
        help="session id to export (repeat for several; default: every session)",
    )
    p.add_argument("-o", "--output", default="-", help="output file ('-' = stdout, the default)")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    if not (Path(args.store) / "index.db").exists():
        print(f"error: {Path(args.store) / 'index.db'} does not exist", file=sys.stderr)
        return 1
    store = Store(args.store)
    try:
        with _open_out(args.output) as out:
            n = export_sessions(store, out, args.session)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `megacontext export ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    print(f"exported {n} message(s)", file=sys.stderr)
    return 0


def import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext import",
        description="Rebuild sessions from a JSONL export: messages are re-tokenised and "
        "re-gisted with this engine's model and GistNet.",
    )
    p.add_argument("input", help="JSONL file written by `megacontext export` ('-' = stdin)")
    _engine_args(p)
    p.add_argument(
        "--session",
        default=None,
        help="import under this id instead of the exported one (single-session files only)",
    )
    p.add_argument(
        "--replace", action="store_true", help="replace a session that already has messages"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="a session holding the file's first messages gets only the rest (an "
        "interrupted import goes on without duplicates)",
    )
    p.add_argument(
        "--defer-gists",
        action="store_true",
        help="return once the messages are stored; the gists are made on the next open",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def import_main(argv: list[str] | None = None) -> int:
    args = import_parser().parse_args(argv)
    f = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")  # noqa: SIM115
    with f:
        try:
            sessions = list(read_export(f))
        except ValueError as e:
            print(f"error: {args.input}: {e}", file=sys.stderr)
            return 1
    if args.session is not None and len(sessions) != 1:
        print(f"error: --session needs a single-session file, got {len(sessions)}", file=sys.stderr)
        return 1
    engine = _engine(args)
    for header, msgs in sessions:
        try:
            s = import_session(
                engine,
                header,
                msgs,
                args.session,
                args.replace,
                resume=args.resume,
                progress=not args.quiet,
                gist=not args.defer_gists,
            )
        except (StoreError, ValueError, TypeError) as e:
            print(f"error: session {header['session']!r}: {e}", file=sys.stderr)
            return 1
        print(f"imported {s.id!r}: {len(msgs)} message(s), {s.token_count()} tokens")
    return 0


def reindex_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext reindex",
        description="Re-gist sessions with a GistNet checkpoint now (otherwise it happens "
        "lazily when a session is next opened).",
    )
    _engine_args(p)
    p.add_argument(
        "--session", action="append", default=None, help="session id (repeat; default: all)"
    )
    p.add_argument(
        "--force", action="store_true", help="re-gist even sessions already at this version"
    )
    return p


def reindex_main(argv: list[str] | None = None) -> int:
    args = reindex_parser().parse_args(argv)
    if not (Path(args.store) / "index.db").exists():
        print(f"error: {Path(args.store) / 'index.db'} does not exist", file=sys.stderr)
        return 1
    engine = _engine(args)
    try:
        recs = reindex(engine.store, engine.gister, args.session, args.force)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in recs:
        what = r.get("skipped") or f"{r['from']} -> {r['to']} in {r['seconds']} s"
        print(f"{r['session']!r}: {what}")
    return 0
