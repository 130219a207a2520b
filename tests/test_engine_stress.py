"""Threads and processes stream, append, delete and create sessions again in one store.

`MEGACONTEXT_STRESS_SECONDS` sets how long they run (default 20; the acceptance run is 120).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
from pathlib import Path

from megacontext_memory import MegaContextEngine
from megacontext_memory.store import SessionDeleted, Store
from megacontext_memory.store.fsck import fsck

SESSIONS = ("s0", "s1", "s2")
SETTINGS = {"working_budget": 256, "gist_refine_steps": 0}


def _work(engine: MegaContextEngine, name: str, seconds: float, acks: Path) -> dict:
    """Random operations on the shared sessions; every acknowledged append is written to
    `acks` as (session, incarnation, seq, content). Only SessionDeleted may be raised."""
    rng = random.Random(name)
    counts = {"append": 0, "stream": 0, "delete": 0, "deleted": 0}
    deadline = time.monotonic() + seconds
    k = 0
    with open(acks, "a", encoding="utf-8") as out:
        while time.monotonic() < deadline:
            sid = rng.choice(SESSIONS)
            op = rng.random()
            try:
                s = engine.session(sid)
                if op < 0.6:
                    content = f"{name} message {k}: " + "word " * rng.randint(1, 30)
                    k += 1
                    m = s.append("user", content)
                    rec = [sid, s.store.incarnation, m.seq, content]
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    counts["append"] += 1
                elif op < 0.9:
                    stream = s.generate(max_new_tokens=6, stream=True)
                    for i, _ in enumerate(stream):
                        if i == 2 and rng.random() < 0.5:
                            break
                    stream.close()
                    counts["stream"] += 1
                else:
                    engine.delete_session(sid)
                    counts["delete"] += 1
            except SessionDeleted:
                counts["deleted"] += 1
    return counts


def _process(store: str, name: str, seconds: float, acks: str, ready, go) -> None:
    import torch

    torch.set_num_threads(1)
    engine = MegaContextEngine(store=store, **SETTINGS)
    ready.set()
    go.wait(600)
    counts = _work(engine, name, seconds, Path(acks))
    Path(acks).with_suffix(".done").write_text(json.dumps(counts))


def test_threads_and_processes_share_sessions_that_come_and_go(engine_factory, tmp_path):
    seconds = float(os.environ.get("MEGACONTEXT_STRESS_SECONDS", "20"))
    store = tmp_path / "st"
    engine = engine_factory(store=store, **SETTINGS)
    ctx = multiprocessing.get_context("spawn")  # the parent's torch threads do not survive fork
    go = ctx.Event()
    procs = []
    for p in range(2):
        ready = ctx.Event()
        proc = ctx.Process(
            target=_process,
            args=(str(store), f"p{p}", seconds, str(tmp_path / f"p{p}.acks"), ready, go),
            daemon=True,
        )
        proc.start()
        procs.append((proc, ready))
    for _, ready in procs:
        assert ready.wait(300), "a worker process did not start"
    results: dict[str, object] = {}

    def thread(name: str) -> None:
        try:
            results[name] = _work(engine, name, seconds, tmp_path / f"{name}.acks")
        except BaseException as e:  # reported below
            results[name] = e

    threads = [threading.Thread(target=thread, args=(f"t{i}",), daemon=True) for i in range(4)]
    go.set()
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 300)
        assert not th.is_alive(), "a thread hung"
    for proc, _ in procs:
        proc.join(seconds + 300)
        assert proc.exitcode == 0, f"worker process ended with {proc.exitcode}"
    errors = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    assert not errors, errors
    done = [json.loads((tmp_path / f"p{p}.done").read_text()) for p in range(2)]
    assert all(c["append"] > 0 for c in [*results.values(), *done])
    assert sum(c["stream"] for c in [*results.values(), *done]) > 0

    live = Store(store)
    current = {sid: live.open_session(sid) for sid in live.sessions()}
    acked = set()
    for path in tmp_path.glob("*.acks"):
        for line in path.read_text(encoding="utf-8").splitlines():
            sid, incarnation, seq, content = json.loads(line)
            ss = current.get(sid)
            if ss is not None and ss.incarnation == incarnation:  # not deleted since
                acked.add((sid, seq, content))
    stored = {
        (sid, m.seq, m.content)
        for sid, ss in current.items()
        for m in ss.messages()
        if m.role == "user"
    }
    assert acked and stored == acked  # every acknowledged message, each in its own session
    assert fsck(store).clean
