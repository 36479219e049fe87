"""The `Engine` seam: what the pipeline needs from a language model, whatever runs it.

Implementations: `LlamaCppEngine` (in-process llama.cpp, the default), `FakeEngine` (tests).
An engine must never log prompt or completion text: they carry patient data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from fhir_adapters.errors import ChartbriefError
from fhir_adapters.models import ModelIdentity


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": "..."}]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None  # constrain the output (llama.cpp grammar) when set
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 42


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str | None = None  # "stop" | "length" | None


@runtime_checkable
class Engine(Protocol):
    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def n_ctx(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    async def generate(self, request: GenerationRequest) -> Generation: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class EngineError(ChartbriefError):
    """The model could not be loaded or run. The message names the setting to fix."""


def generation_of(completion: dict[str, Any], seconds: float) -> Generation:
    """A Generation from an OpenAI-style chat completion (llama.cpp in-process or a llama.cpp server).

    >>> generation_of({"choices": [{"message": {"content": "{}"}, "finish_reason": "stop"}],
    ...                "usage": {"prompt_tokens": 3, "completion_tokens": 1}}, 0.5).completion_tokens
    1
    """
    try:
        choice = completion["choices"][0]
        usage = completion.get("usage") or {}
        return Generation(
            text=choice["message"].get("content") or "",
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
            finish_reason=choice.get("finish_reason"),
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EngineError("the model answered without a chat completion") from exc
