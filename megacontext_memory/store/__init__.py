"""Durable storage: a SQLite index plus fixed-width payload files per session and level."""

from .payload import PayloadError, PayloadFile
from .sqlite import (
    GistVersionMismatch,
    Message,
    SessionDeleted,
    SessionStore,
    Store,
    StoreError,
)

__all__ = [
    "GistVersionMismatch",
    "Message",
    "PayloadError",
    "PayloadFile",
    "SessionDeleted",
    "SessionStore",
    "Store",
    "StoreError",
]
