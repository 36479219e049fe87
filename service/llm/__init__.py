"""Language-model engines behind the `Engine` protocol, and the factory that picks one.

Importing this package does not load llama.cpp; `create_engine()` does, when it is called.
"""

from __future__ import annotations

from service.config import LlmSettings
from service.llm.base import Engine, EngineError, Generation, GenerationRequest

__all__ = ["Engine", "EngineError", "Generation", "GenerationRequest", "create_engine"]


def create_engine(settings: LlmSettings) -> Engine:
    """The engine the settings ask for: a pool of llama.cpp servers when `servers` lists any,
    else the in-process llama.cpp engine.

    Loads the model (seconds for a large GGUF): call it once at process start, not per request.
    """
    if settings.servers:
        from service.llm.remote import RemoteLlamaPool  # deferred: loads the native library

        return RemoteLlamaPool(settings)
    from service.llm.llamacpp import LlamaCppEngine  # deferred: loads the native library

    return LlamaCppEngine(settings)
