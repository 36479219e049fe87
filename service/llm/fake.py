"""A scripted `Engine` for tests: it returns what the test enqueued and records what it was asked.

It never runs a model. Its token count (about four characters per token) is a stand-in that is
good enough to exercise budget packing. It raises a clear error when asked for more outputs than
were scripted, so a test never passes by accident on an empty answer.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncIterator

from fhir_adapters.models import ModelIdentity
from service.llm.base import EngineError, Generation, GenerationRequest

FAKE_IDENTITY = ModelIdentity(
    name="fake-model",
    file_name="fake-model.gguf",
    sha256="0" * 64,
    quantization="none",
    runtime="fake",
    sampling="temperature=0.0 top_p=1.0 seed=42 n_ctx=2048",
)


class FakeEngineExhausted(EngineError):
    """`generate()` or `stream()` was called with nothing left in the queue."""


class FakeEngine:
    """An `Engine` whose outputs are scripted with `enqueue()`; `history` holds every request seen."""

    def __init__(self, identity: ModelIdentity = FAKE_IDENTITY, n_ctx: int = 2048) -> None:
        self._identity = identity
        self._n_ctx = n_ctx
        self._outputs: deque[str | Exception] = deque()
        self.history: list[GenerationRequest] = []
        self.closed = False

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def enqueue(self, output: str | Exception) -> None:
        """Script the next output; an exception instance is raised by the call that takes it."""
        self._outputs.append(output)

    @property
    def pending(self) -> int:
        return len(self._outputs)

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    async def generate(self, request: GenerationRequest) -> Generation:
        text = self._next(request)
        return Generation(
            text=text,
            prompt_tokens=sum(self.count_tokens(m["content"]) for m in request.messages),
            completion_tokens=self.count_tokens(text),
            seconds=0.0,
            finish_reason="stop",
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        text = self._next(request)
        # Word-sized pieces, whitespace kept, so joining the pieces gives back the text.
        for piece in re.findall(r"\s*\S+|\s+", text):
            yield piece

    async def aclose(self) -> None:
        self.closed = True

    def _next(self, request: GenerationRequest) -> str:
        if self.closed:
            raise EngineError("the fake engine was closed")
        self.history.append(request)
        if not self._outputs:
            raise FakeEngineExhausted(
                f"FakeEngine has no scripted output left for request #{len(self.history)}: "
                "call enqueue() once per expected generation"
            )
        output = self._outputs.popleft()
        if isinstance(output, Exception):
            raise output
        return output
