"""Per-session turn locks: one turn (ingest + generate + reply) of a session at a time.

A turn reads the session's tail, ingests what is new and appends the reply; two turns of
one session interleaved would ingest a window twice or chain a reply onto the wrong
message. The lock is keyed by store and session and holds across threads and processes
(the store's `KeyLocks` on a `turn-locks` file at the store root). It is a separate file
from the store's own write locks, so the engine may append from another thread while a
turn holds its session.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .store.locks import KeyLocks
from .store.sqlite import session_key

LOCK_FILE = "turn-locks"

_locks: dict[str, KeyLocks] = {}
_guard = threading.Lock()


def _for(store_path: str | os.PathLike) -> KeyLocks:
    path = os.path.realpath(Path(store_path) / LOCK_FILE)
    with _guard:
        if path not in _locks:
            _locks[path] = KeyLocks(Path(path))
        return _locks[path]


@contextlib.contextmanager
def turn_lock(store_path: str | os.PathLike, session_id: str) -> Iterator[None]:
    """Hold session `session_id` of the store at `store_path` (nests within a thread)."""
    with _for(store_path).hold(session_key(session_id)):
        yield
