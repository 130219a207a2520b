"""Per-session write locks shared by threads and processes.

One `locks` file at the store root; session `key` owns one byte of it. On Linux the lock is
an open-file-description (OFD) lock on a descriptor opened for each hold, so threads of one
process exclude each other exactly like processes do, closing one descriptor never drops
another holder's lock, and a process that dies releases its locks with its descriptors.
Holds nest within a thread. Elsewhere, POSIX `lockf` on one shared descriptor per process
plus a thread lock per key gives the same behaviour.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

_OFD = hasattr(fcntl, "F_OFD_SETLKW")
_held = threading.local()  # (lock file, key) -> nesting depth, per thread


def _offset(key: str) -> int:
    return int(key[:15], 16)  # < 2**60: a byte of the (sparse, empty) lock file


def _ofd(fd: int, kind: int, offset: int) -> None:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, struct.pack("hhqqi4x", kind, os.SEEK_SET, offset, 1, 0))


class KeyLocks:
    """Exclusive lock per key over one lock file."""

    _fallback: dict[str, tuple[int, dict[str, threading.RLock]]] = {}
    _guard = threading.Lock()

    def __init__(self, lock_path: Path):
        self.path = os.path.realpath(lock_path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if _OFD:
            os.close(fd)
        else:  # pragma: no cover - non-Linux
            with self._guard:
                if self.path in self._fallback:
                    os.close(fd)  # never happens with locks held: the entry exists already
                else:
                    self._fallback[self.path] = (fd, {})

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        depth = _held.__dict__.setdefault("depth", {})
        ident = (self.path, key)
        if depth.get(ident):
            depth[ident] += 1
            try:
                yield
            finally:
                depth[ident] -= 1
            return
        with self._acquire(key):
            depth[ident] = 1
            try:
                yield
            finally:
                del depth[ident]

    @contextlib.contextmanager
    def _acquire(self, key: str) -> Iterator[None]:
        offset = _offset(key)
        if _OFD:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                _ofd(fd, fcntl.F_WRLCK, offset)
                yield
            finally:
                os.close(fd)  # releases the lock, also when the holder is killed
            return
        fd, tlocks = self._fallback[self.path]  # pragma: no cover - non-Linux
        with self._guard:
            tlock = tlocks.setdefault(key, threading.RLock())
        with tlock:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


def _reset_after_fork() -> None:
    _held.__dict__.clear()  # a forked child holds none of its parent's locks


os.register_at_fork(after_in_child=_reset_after_fork)
