"""Crash and concurrency harnesses for the store (used by the tests and `store_bench`).

The writers drive the real `MegaContextTree` (real gisting) over a tiny deterministic model:
a seeded random embedding table and a small untrained `GistStack`, so a child process starts
in milliseconds and thousands of appends fit in a test. Messages are generated from
(seed, index), so any process can say what message `i` must be, byte for byte.
"""

from __future__ import annotations

import os
import random
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TINY_MODEL = "tiny-test-model"
TINY_WIDTH = 64
TINY_VERSION = "tiny-v1"
TINY_VERSION_2 = "tiny-v2"
_ALPHABET = "abcdefghij klmnopqrstuvwxyz ÄÖÜ 日本語 😀 \n\t\"'\\{}"


class TinyBase:
    """Just enough of `BaseModel` for `Gister`: a fixed embedding table."""

    def __init__(self, width: int = TINY_WIDTH, vocab: int = 512, seed: int = 0):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, width, generator=g) * 0.05
        self.width, self.name, self.device = width, TINY_MODEL, torch.device("cpu")
        self.embed_rms = float(self.table.pow(2).mean().sqrt())

    def embed(self, ids):
        import torch

        return self.table[torch.as_tensor(ids, dtype=torch.long)]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))  # ids < 256 < vocab


def tiny_gister(version: str = TINY_VERSION, seed: int = 0):
    import torch

    from ..gisting import Gister
    from ..models.gistnet import GistStack

    torch.set_num_threads(1)
    base = TinyBase()
    torch.manual_seed(seed + (zlib.crc32(version.encode()) if version != TINY_VERSION else 0))
    stack = GistStack(base.width, hidden=32, heads=4, embed_rms=base.embed_rms)
    gister = Gister(base, stack, version, "float16")
    gister.batch = 64
    return gister


def message(seed: int, i: int, max_chars: int = 240) -> tuple[str, str, dict]:
    """Message `i` of stream `seed`: (role, content, metadata), deterministic."""
    rng = random.Random(seed * 1_000_003 + i)
    n = rng.randint(1, max_chars)
    content = "".join(rng.choice(_ALPHABET) for _ in range(n))
    role = ("user", "assistant", "system", "tool")[rng.randrange(4)]
    return role, content, {"i": i, "seed": seed, "tag": rng.choice(["a", "ß", None, 3.5])}


def open_tree(store_path, session_id: str, gister, reindex: bool = False):
    from ..store import Store
    from ..tree import MegaContextTree

    store = Store(store_path)
    ss = store.session(
        session_id,
        model=TINY_MODEL,
        width=gister.base.width,
        block_size=32,
        gist_dtype="float16",
        gist_version=gister.version,
    )
    return MegaContextTree(ss, gister, reindex)


def writer(
    store_path,
    session_id: str,
    seed: int,
    ack_fd: int | None,
    limit: int = 10**9,
    regist_every: int = 0,
) -> None:
    """Append messages of stream `seed` after those committed; ack each index on `ack_fd`.

    With `regist_every` = n, the GistNet version flips every n messages: each flip re-gists
    the whole session explicitly (so kills also land inside re-gisting).
    """
    gisters = [tiny_gister(), tiny_gister(TINY_VERSION_2)] if regist_every else [tiny_gister()]
    tree = open_tree(store_path, session_id, gisters[0], reindex=bool(regist_every))
    base = gisters[0].base
    start = tree.store.row()["n_messages"]
    for i in range(start, start + limit):
        gister = gisters[(i // regist_every) % 2] if regist_every else gisters[0]
        if tree.gister is not gister:
            tree = open_tree(store_path, session_id, gister, reindex=True)
        role, content, meta = message(seed, i)
        tree.append(role, content, meta, base.encode(content))
        tree.make_gists()  # as a turn would: kills land in gisting too
        if ack_fd is not None:
            os.write(ack_fd, f"{i}\n".encode())


def rebuild(gister, tokens: np.ndarray) -> dict[int, np.ndarray]:
    """Every gist level of `tokens` computed from scratch, as `MegaContextTree.regist` does."""
    gists, level = {}, 1
    children = tokens[: len(tokens) // 32 * 32].reshape(-1, 32)
    while len(children):
        gists[level] = gister.gists(level, children)
        n = len(gists[level]) // 32 * 32
        children = gists[level][:n].astype(np.float32).reshape(-1, 32, gister.base.width)
        level += 1
    return gists


def verify(store_path, session_id: str, seed: int, acked: int, gister, others=()) -> dict:
    """Check a session after a crash: returns stats; raises AssertionError on any fault.

    The session is opened with whichever of `gister`, *`others` made its gists."""
    from ..store import Store
    from ..store.fsck import fsck

    store = Store(store_path)
    if store.has_session(session_id):
        version = store.open_session(session_id).gist_version
        gister = next((g for g in (gister, *others) if g.version == version), gister)
    tree = open_tree(store_path, session_id, gister)  # opening cuts torn writes
    rep = fsck(store_path)
    assert rep.clean, rep.lines()
    notes = [n for n in rep.notes if "left by" in n or "torn" in n]
    assert not notes, notes
    tree.make_gists()  # what a crash left ungisted is made on the next open
    msgs = tree.store.messages()
    assert len(msgs) >= acked, f"{acked} acknowledged, {len(msgs)} present"
    want_tokens = []
    for m in msgs:
        role, content, meta = message(seed, m.seq)
        got = (m.role, m.content, m.metadata)
        assert got == (role, content, meta), f"message {m.seq} differs: {got!r}"
        assert m.content.encode() == content.encode()
        ids = gister.base.encode(content)
        assert (m.token_start, m.token_end) == (len(want_tokens), len(want_tokens) + len(ids))
        want_tokens += ids
    tokens = tree.store.tokens()
    assert np.array_equal(tokens, np.asarray(want_tokens, np.int64)), "tokens differ"
    want = rebuild(gister, tokens)
    counts = tree.store.counts()
    assert set(counts) - {0} == set(want), (counts, {k: len(v) for k, v in want.items()})
    max_diff = 0.0
    for level, arr in want.items():
        got = tree.store.gists(level, 0, counts[level])
        assert got.shape == arr.shape, (level, got.shape, arr.shape)
        diff = float(np.abs(got.astype(np.float32) - arr.astype(np.float32)).max(initial=0))
        max_diff = max(max_diff, diff)
        assert diff <= 2e-3, f"level {level}: gists differ from a rebuild by {diff}"
    return {"messages": len(msgs), "tokens": len(tokens), "gist_max_diff": max_diff}


@dataclass
class CrashResult:
    kills: int = 0
    acked: int = 0
    messages: int = 0
    tokens: int = 0
    gist_max_diff: float = 0.0
    exact_gists: bool = True
    seconds: float = 0.0
    per_kill: list[dict] = field(default_factory=list)


def crash_loop(
    store_path,
    kills: int,
    seed: int = 0,
    max_delay: float = 0.4,
    session_id: str = "crash",
    regist_every: int = 0,
) -> CrashResult:
    """Fork a writer, SIGKILL it at a random moment, verify; `kills` times."""
    rng = random.Random(seed)
    gister = tiny_gister()
    others = [tiny_gister(TINY_VERSION_2)] if regist_every else []
    res = CrashResult()
    t0 = time.perf_counter()
    acked = 0
    while res.kills < kills:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            code = 0
            try:
                os.close(r)
                writer(store_path, session_id, seed, w, regist_every=regist_every)
            except BaseException:  # pragma: no cover - reported through the exit status
                import traceback

                traceback.print_exc()
                code = 3
            os._exit(code)
        os.close(w)
        time.sleep(rng.uniform(0.0, max_delay))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            raise AssertionError(f"writer ended by itself (status {status}) before the kill")
        lines = [int(x) for x in data.split()]
        if lines:
            acked = max(acked, lines[-1] + 1)
        res.kills += 1
        stats = verify(store_path, session_id, seed, acked, gister, others)
        stats["acked"] = acked
        res.per_kill.append(stats)
        res.gist_max_diff = max(res.gist_max_diff, stats["gist_max_diff"])
    res.acked, res.messages = acked, res.per_kill[-1]["messages"]
    res.tokens = res.per_kill[-1]["tokens"]
    res.exact_gists = res.gist_max_diff == 0.0
    res.seconds = time.perf_counter() - t0
    return res


def concurrent_writers(
    store_path, processes: int = 8, sessions: int = 50, messages: int = 4, seed: int = 0
) -> dict:
    """`processes` processes each append `messages` messages to every one of `sessions`
    sessions (interleaved, so every session has all processes writing to it); then check
    that every message is present exactly once, in its session, intact."""
    pids = []
    t0 = time.perf_counter()
    for p in range(processes):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _concurrent_child(store_path, p, sessions, messages, seed)
            except BaseException:  # pragma: no cover
                import traceback

                traceback.print_exc()
                code = 3
            os._exit(code)
        pids.append(pid)
    errors = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        errors += status != 0
    seconds = time.perf_counter() - t0
    from ..store import Store

    store = Store(store_path)
    lost = misplaced = 0
    for s in range(sessions):
        sid = f"s{s}/../\u00e9\0{s}"
        ss = store.open_session(sid)
        msgs = ss.messages()
        seen = {}
        for m in msgs:
            p, k = m.metadata["p"], m.metadata["k"]
            role, content, _ = message(seed * 1000 + p, s * messages + k)
            if m.metadata["s"] != s or m.content != content or m.role != role:
                misplaced += 1
            seen[(p, k)] = seen.get((p, k), 0) + 1
        want = {(p, k) for p in range(processes) for k in range(messages)}
        lost += len(want - set(seen))
        misplaced += sum(c - 1 for c in seen.values()) + len(set(seen) - want)
    return {
        "processes": processes,
        "sessions": sessions,
        "messages": processes * sessions * messages,
        "errors": errors,
        "lost": lost,
        "misplaced": misplaced,
        "seconds": seconds,
    }


def _concurrent_child(store_path, p: int, sessions: int, messages: int, seed: int) -> None:
    gister = tiny_gister()
    trees = {}
    order = [(s, k) for k in range(messages) for s in range(sessions)]
    random.Random(p).shuffle(order)
    order.sort(key=lambda sk: sk[1])  # keep each process's own messages in order per session
    for s, k in order:
        sid = f"s{s}/../\u00e9\0{s}"
        if s not in trees:
            trees[s] = open_tree(store_path, sid, gister)
        role, content, _ = message(seed * 1000 + p, s * messages + k)
        trees[s].append(role, content, {"p": p, "k": k, "s": s}, gister.base.encode(content))


def scan_for(store_path, needle: bytes) -> list[str]:
    """Paths under the store whose names or bytes contain `needle` (for deletion checks)."""
    hits = []
    for root, _dirs, files in os.walk(store_path):
        for f in files:
            p = Path(root, f)
            if needle in p.name.encode() or needle in p.read_bytes():
                hits.append(str(p))
    return hits
