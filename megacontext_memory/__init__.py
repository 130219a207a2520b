"""megacontext-memory: unbounded memory for a small frozen LLM at constant cost per turn."""

from .config import Config
from .engine import MegaContextEngine, Session
from .focus import WorkingContext, check_invariants
from .models.checkpoint import CheckpointMismatch
from .store import Message, StoreError

__all__ = [
    "CheckpointMismatch",
    "Config",
    "MegaContextEngine",
    "Message",
    "Session",
    "StoreError",
    "WorkingContext",
    "check_invariants",
]
__version__ = "0.1.0"
