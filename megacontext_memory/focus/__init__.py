"""The working context, the focus allocator and the scorers that steer it."""

from .allocator import FocusAllocator, Move
from .scorers import HeuristicScorer, Scorer
from .working_context import Entry, InvariantError, WorkingContext, check_invariants

__all__ = [
    "Entry",
    "FocusAllocator",
    "HeuristicScorer",
    "InvariantError",
    "Move",
    "Scorer",
    "WorkingContext",
    "check_invariants",
]
