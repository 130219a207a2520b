"""Memories a user would reach for instead of MegaContext, read by the same frozen model:
the newest messages that fit (truncation), the whole history (full context) and FAISS
retrieval over embedded chunks (`RagMemory`, needs the `rag` extra)."""

from .context import SYSTEM_PROMPT, newest_that_fit, prompt_ids, read

__all__ = ["SYSTEM_PROMPT", "newest_that_fit", "prompt_ids", "read"]
