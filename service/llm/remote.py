"""An engine that spreads requests over a pool of OpenAI-compatible llama.cpp servers.

For scale-out: a hospital adds GPU boxes running `llama-server` or `python -m llama_cpp.server`
with the same GGUF and lists them in `CHARTBRIEF_LLM__SERVERS`; no code changes. Each server
takes at most `per_server_concurrency` requests at once; a request goes to the server with the
most free slots, and a server that fails (connection, timeout, 5xx) rests for a cool-down while
the request moves to another one.

The same GGUF must be readable here too (`CHARTBRIEF_LLM__MODEL_PATH`, or the default): it is
loaded with its vocabulary only (megabytes, not the weights) so prompts are packed with the
model's own tokenizer, and its sha256 names the model in every Device and Provenance exactly as
the in-process engine does.

Must not: log prompt or completion text, or send anything but the chat request to a server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
from llama_cpp import Llama

from fhir_adapters.models import ModelIdentity
from service.config import LlmSettings
from service.llm.base import EngineError, Generation, GenerationRequest, generation_of
from service.llm.grammar import chat_params, gbnf_for_schema
from service.llm.model_files import MODEL_PATH_SETTING, model_identity, resolve_model_path

log = structlog.get_logger(__name__)

SERVERS_SETTING = "CHARTBRIEF_LLM__SERVERS"


@dataclass
class _Server:
    base_url: str  # ends in /v1
    slots: asyncio.Semaphore
    capacity: int
    resting_until: float = 0.0
    in_flight: int = 0
    served: int = 0
    failures: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight


@dataclass
class ServerPool:
    """Picks a server for each request, bounded per server. Pure bookkeeping, no IO."""

    servers: list[_Server]
    cooldown_seconds: float = 30.0
    _turn: int = field(default=0)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @classmethod
    def of(cls, urls: list[str], per_server: int, cooldown_seconds: float = 30.0) -> ServerPool:
        servers = [_Server(u.rstrip("/"), asyncio.Semaphore(per_server), per_server) for u in urls]
        return cls(servers=servers, cooldown_seconds=cooldown_seconds)

    def pick(self, exclude: set[str], now: float) -> _Server | None:
        """The awake server with the most free slots (round robin among equals), or None."""
        candidates = [
            s for s in self.servers if s.base_url not in exclude and s.resting_until <= now and s.free > 0
        ]
        if not candidates:
            return None
        self._turn += 1
        best = max(s.free for s in candidates)
        tied = [s for s in candidates if s.free == best]
        return tied[self._turn % len(tied)]

    async def acquire(self, exclude: set[str]) -> _Server:
        async with self._changed:
            while True:
                now = time.monotonic()
                awake = [s for s in self.servers if s.base_url not in exclude and s.resting_until <= now]
                if not awake:
                    raise EngineError(
                        f"no model server is available ({len(self.servers)} in {SERVERS_SETTING}, "
                        f"{len(exclude)} failed for this request)"
                    )
                server = self.pick(exclude, now)
                if server is not None:
                    server.in_flight += 1
                    return server
                await self._changed.wait()

    async def release(self, server: _Server, *, failed: bool) -> None:
        async with self._changed:
            server.in_flight -= 1
            if failed:
                server.failures += 1
                server.resting_until = time.monotonic() + self.cooldown_seconds
            else:
                server.served += 1
            self._changed.notify_all()


class RemoteLlamaPool:
    """An `Engine` whose generations run on OpenAI-compatible llama.cpp servers."""

    def __init__(
        self, settings: LlmSettings, *, http: httpx.AsyncClient | None = None, cooldown_seconds: float = 30.0
    ) -> None:
        if not settings.servers:
            raise EngineError(f"{SERVERS_SETTING} lists no server")
        path = resolve_model_path(settings)
        try:
            # Vocabulary only: the tokenizer for packing, without the weights.
            self._vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"{MODEL_PATH_SETTING}: llama.cpp could not read {path}: {exc}") from exc
        # A server opens its own context (--ctx-size); the setting says what it is.
        self._n_ctx = settings.n_ctx or settings.n_ctx_max
        self._identity = model_identity(path, settings, metadata=self._vocab.metadata, n_ctx=self._n_ctx)
        self._pool = ServerPool.of(settings.servers, settings.per_server_concurrency, cooldown_seconds)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.request_timeout_seconds, connect=5.0)
        )
        log.info("model_pool_ready", servers=len(settings.servers), file=self._identity.file_name)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def pool(self) -> ServerPool:
        return self._pool

    def count_tokens(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    async def generate(self, request: GenerationRequest) -> Generation:
        body = self._body(request, stream=False)
        tried: set[str] = set()
        while True:
            server = await self._pool.acquire(tried)
            started = time.perf_counter()
            try:
                response = await self._http.post(f"{server.base_url}/chat/completions", json=body)
                if response.status_code >= 500:
                    raise _ServerFailed(f"HTTP {response.status_code}")
                if response.status_code >= 400:
                    await self._pool.release(server, failed=False)
                    raise EngineError(f"model server refused the request: HTTP {response.status_code}")
                data = response.json()
            except (httpx.TransportError, _ServerFailed, ValueError) as exc:
                await self._pool.release(server, failed=True)
                tried.add(server.base_url)
                log.warning("model_server_failed", server=server.base_url, error=type(exc).__name__)
                continue
            await self._pool.release(server, failed=False)
            return _generation(data, time.perf_counter() - started, server.base_url)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        body = self._body(request, stream=True)
        server = await self._pool.acquire(set())
        failed = False
        try:
            async with self._http.stream(
                "POST", f"{server.base_url}/chat/completions", json=body
            ) as response:
                if response.status_code >= 400:
                    failed = response.status_code >= 500
                    raise EngineError(f"model server refused the request: HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    piece = json.loads(payload)["choices"][0].get("delta", {}).get("content")
                    if piece:
                        yield piece
        except httpx.TransportError as exc:
            failed = True
            raise EngineError(f"model server {server.base_url} failed: {type(exc).__name__}") from exc
        finally:
            await self._pool.release(server, failed=failed)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()
        self._vocab.close()

    def _body(self, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
        body = chat_params(request) | {"stream": stream}
        if request.json_schema is not None:
            body["grammar"] = gbnf_for_schema(request.json_schema)
        return body


class _ServerFailed(Exception):
    """A server answered 5xx: try another one."""


def _generation(data: dict[str, Any], seconds: float, server: str) -> Generation:
    generation = generation_of(data, seconds)
    log.info(
        "generation_done",
        server=server,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        seconds=round(seconds, 2),
    )
    return generation
