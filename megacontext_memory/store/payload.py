"""Fixed-width payload files: one per session and tree level.

Layout: a 64-byte little-endian header, then node records back to back, so node `i`
sits at `64 + i * record_size`. Level 0 holds uint32 token ids; levels >= 1 hold gist
vectors. Appends are fsynced before the SQLite commit that makes them visible; bytes past
the committed extent are torn writes and are cut off on open.

Header: magic u32 | format u16 | level u16 | block_size u16 | width u32 | dtype u16 |
        model name (utf-8, zero padded to the end of the 64 bytes)
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = 0x4D434354  # "MCCT"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_FIXED = struct.Struct("<IHHHIH")  # 16 bytes; the model name fills the remaining 48
DTYPES = {1: np.dtype("<u4"), 2: np.dtype("<f2"), 3: np.dtype("<f4"), 4: np.dtype("<u2")}
DTYPE_CODES = {"uint32": 1, "float16": 2, "float32": 3, "bfloat16": 4}  # bf16: its u16 bits
_BF16 = 4


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (as <u2) of float values, rounded to nearest even."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view("<u2")


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns: the 16 bits are a float32's high half."""
    return (np.asarray(bits, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


class PayloadError(RuntimeError):
    """A payload file is corrupt, truncated or belongs to something else."""


class PayloadFile:
    """One level's node records for one session."""

    def __init__(self, path: Path, level: int, width: int, dtype: str, model: str, block_size: int):
        self.path, self.level, self.width, self.model = Path(path), level, width, model
        self.block_size = block_size
        self.dtype_code = DTYPE_CODES[dtype]
        self.np_dtype = DTYPES[self.dtype_code]
        self.record_size = self.np_dtype.itemsize * width

    def _encode(self, records: np.ndarray) -> np.ndarray:
        """Records as the bytes-to-be of the file: bfloat16 values become their bits."""
        if self.dtype_code == _BF16:
            records = to_bfloat16_bits(records)
        return np.ascontiguousarray(records, dtype=self.np_dtype).reshape(-1, self.width)

    def header(self) -> bytes:
        name = self.model.encode()[: HEADER_SIZE - _FIXED.size]
        fixed = _FIXED.pack(
            MAGIC, FORMAT_VERSION, self.level, self.block_size, self.width, self.dtype_code
        )
        return (fixed + name).ljust(HEADER_SIZE, b"\0")

    def check_header(self) -> None:
        """Raise PayloadError naming the file and the fault if the header is not ours."""
        with open(self.path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise PayloadError(f"{self.path}: header truncated ({len(raw)} of {HEADER_SIZE} bytes)")
        if raw != self.header():
            magic, fmt, level, block, width, code = _FIXED.unpack(raw[: _FIXED.size])
            found = dict(magic=hex(magic), format=fmt, level=level, block_size=block, width=width)
            want = dict(
                magic=hex(MAGIC),
                format=FORMAT_VERSION,
                level=self.level,
                block_size=self.block_size,
                width=self.width,
            )
            bad = {k: (found[k], want[k]) for k in want if found[k] != want[k]}
            if code != self.dtype_code:
                bad["dtype"] = (code, self.dtype_code)
            if not bad:
                bad["model"] = (
                    raw[_FIXED.size :].rstrip(b"\0").decode(errors="replace"),
                    self.model,
                )
            detail = ", ".join(f"{k}={a} (expected {b})" for k, (a, b) in bad.items())
            raise PayloadError(f"{self.path}: bad header: {detail}")

    def records_on_disk(self) -> int:
        return max(0, (self.path.stat().st_size - HEADER_SIZE)) // self.record_size

    def offset(self, index: int) -> int:
        """Byte offset of record `index`."""
        return HEADER_SIZE + index * self.record_size

    def rewrite_header(self) -> None:
        """Put back the header this file must have (it is fully determined by the session)."""
        with open(self.path, "r+b") as f:
            f.write(self.header())
            f.flush()
            os.fsync(f.fileno())

    def open_at(self, committed: int, repair: bool = True) -> None:
        """Make the file hold exactly `committed` records (create it if needed).

        Extra bytes are an interrupted append that was never committed: cut them. Fewer
        bytes than committed means acknowledged data is gone: that is an error.
        """
        if not self.path.exists():
            if committed:
                raise PayloadError(f"{self.path}: missing, but {committed} records are committed")
            self._write_new()
            return
        self.check_header()
        size = self.path.stat().st_size
        want = HEADER_SIZE + committed * self.record_size
        if size < want:
            raise PayloadError(
                f"{self.path}: truncated: {size} bytes, committed extent needs {want} "
                f"({committed} records of {self.record_size} bytes)"
            )
        if size > want and repair:
            with open(self.path, "r+b") as f:
                f.truncate(want)
                os.fsync(f.fileno())

    def _write_new(self, records: np.ndarray | None = None) -> None:
        """Create the file (header, then `records`) under a temporary name, fsync, rename."""
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "wb") as f:
            f.write(self.header())
            if records is not None and len(records):
                f.write(self._encode(records).tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        _fsync_dir(self.path.parent)

    def write_all(self, records: np.ndarray) -> None:
        """Replace the whole file atomically with `records` (used by re-gisting)."""
        self._write_new(records)

    def write_at(self, start: int, records: np.ndarray) -> None:
        """Write records starting at record index `start` (the committed end), fsynced."""
        data = self._encode(records)
        if not len(data):
            return
        with open(self.path, "r+b") as f:
            f.seek(HEADER_SIZE + start * self.record_size)
            f.write(data.tobytes())
            f.flush()
            _datasync(f.fileno())  # data and the new size: all a reader needs

    def read(self, start: int, end: int) -> np.ndarray:
        """Records [start, end) as an array of shape [end - start, width] (bfloat16 gists
        as float32 values)."""
        if end <= start:
            return np.zeros(
                (0, self.width), np.float32 if self.dtype_code == _BF16 else self.np_dtype
            )
        try:
            arr = np.memmap(
                self.path,
                dtype=self.np_dtype,
                mode="r",
                offset=HEADER_SIZE + start * self.record_size,
                shape=((end - start) * self.width,),
            )
        except FileNotFoundError:
            raise PayloadError(f"{self.path}: missing, but records are committed") from None
        except ValueError:  # mmap past the end of the file
            size = self.path.stat().st_size
            raise PayloadError(
                f"{self.path}: truncated: {size} bytes, records [{start}, {end}) need "
                f"{self.offset(end)}"
            ) from None
        out = np.array(arr).reshape(end - start, self.width)
        del arr
        return from_bfloat16_bits(out) if self.dtype_code == _BF16 else out


_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
