"""Durable storage: a SQLite index plus fixed-width payload files per session and level."""

from .payload import PayloadError, PayloadFile
from .sqlite import Message, SessionStore, Store, StoreError

__all__ = ["Message", "PayloadError", "PayloadFile", "SessionStore", "Store", "StoreError"]
