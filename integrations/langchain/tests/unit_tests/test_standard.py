"""langchain-tests standard unit tests (no model is loaded: the engine starts lazily)."""

import tempfile

from langchain_megacontext import ChatMegaContext
from langchain_tests.unit_tests import ChatModelUnitTests

STORE = tempfile.mkdtemp(prefix="mc-lc-unit-")


class TestChatMegaContextUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatMegaContext]:
        return ChatMegaContext

    @property
    def chat_model_params(self) -> dict:
        # a fixed relative path keeps the serialisation snapshot stable; nothing is
        # created there because the engine only starts on the first call
        return {"store": "mc-unit-store", "working_budget": 512}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return ({"MEGACONTEXT_STORE": STORE}, {}, {"store": STORE})
