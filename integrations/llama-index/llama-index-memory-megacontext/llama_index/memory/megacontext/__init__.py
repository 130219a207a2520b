"""LlamaIndex memory kept in a MegaContext store."""

from .base import MegaContextMemory

__all__ = ["MegaContextMemory"]
