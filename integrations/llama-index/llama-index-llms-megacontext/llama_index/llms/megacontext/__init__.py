"""LlamaIndex LLM backed by MegaContext memory."""

from .base import MegaContextLLM

__all__ = ["MegaContextLLM"]
