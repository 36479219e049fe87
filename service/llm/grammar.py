"""What every llama.cpp engine sends: the sampling parameters of a request, and its JSON schema as
a GBNF grammar (understood in-process and by llama-server / llama_cpp.server alike).

Converting a schema costs milliseconds, but batch jobs send the same one thousands of times, so
conversions are cached by the schema's canonical JSON.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from service.llm.base import EngineError, GenerationRequest


def chat_params(request: GenerationRequest) -> dict[str, Any]:
    """The chat-completion parameters of a request, without its grammar."""
    return {
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "stop": list(request.stop),
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
    }


def gbnf_for_schema(schema: dict[str, Any]) -> str:
    """A GBNF grammar that only accepts JSON matching `schema`; a schema that cannot be converted is
    an EngineError (llama-cpp-python's own response_format would silently fall back to any JSON)."""
    return _gbnf(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=32)
def _gbnf(schema_json: str) -> str:
    try:
        return str(json_schema_to_gbnf(schema_json))
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors alike
        raise EngineError(f"the prompt's output schema cannot be turned into a grammar: {exc}") from exc
