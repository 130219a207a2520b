"""LangChain integration for MegaContext memory: a chat model and a chat message history."""

from .chat_history import MegaContextChatMessageHistory
from .chat_models import ChatMegaContext

__all__ = ["ChatMegaContext", "MegaContextChatMessageHistory"]
__version__ = "0.1.0"
