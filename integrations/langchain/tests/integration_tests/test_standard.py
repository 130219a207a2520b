"""langchain-tests standard integration tests against the real default model.

The model (SmolLM2-135M) is tiny: replies are kept short. Tool calls and structured
output are decoded under the tool's JSON schema, so those tests exercise the plumbing
(binding, rendering, decoding, parsing, streaming) rather than the model's intelligence.
"""

import tempfile

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_megacontext import ChatMegaContext
from langchain_tests.integration_tests import ChatModelIntegrationTests

STORE = tempfile.mkdtemp(prefix="mc-lc-integration-")
pytestmark = pytest.mark.slow  # ~40 real generations, tool calls decoded token by token


class TestChatMegaContextIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatMegaContext]:
        return ChatMegaContext

    @property
    def chat_model_params(self) -> dict:
        return {"store": STORE, "working_budget": 512, "max_tokens": 8, "max_string_tokens": 8}

    @property
    def supports_model_override(self) -> bool:
        return False  # one frozen base model per engine

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        llm = ChatMegaContext(**self.chat_model_params)
        first = HumanMessage("Remember the word apple.")
        reply = llm.invoke([first])
        messages = [first, reply, HumanMessage("Which word?")]
        if stream:
            full = None
            for chunk in llm.stream(messages):
                full = chunk if full is None else full + chunk
            return full
        return llm.invoke(messages)
