"""The default engine: a GGUF model run in-process by llama.cpp (llama-cpp-python).

The model is loaded once per engine. Native inference runs in a worker thread so the event loop
stays free; an asyncio.Lock queues callers (one inference at a time per model, waiting callers
hold no thread) and a threading.Lock guards the native model itself, because a stream whose
reader went away may still be finishing in its thread.

When a request carries a JSON schema it is turned into a llama.cpp grammar here, so the model
can only emit JSON of that shape. (llama-cpp-python's `response_format={"type": "json_object",
"schema": ...}` does the same conversion but silently falls back to "any JSON" when the schema
cannot be converted; converting here makes that failure loud.) The grammar checks the chosen token
first and masks the whole vocabulary only when it rejects it (`sampling.py`,
`llm.grammar_sampling`), unless set to llama-cpp-python's stock full-vocabulary sampler.

Prompt reuse: llama-cpp-python keeps what the next prompt shares with the previous one; on top of
that `_ChartbriefLlama` keeps the KV state of each template's fixed prefix (up to the end of the
system message, `prefix_cache.py`, `llm.prompt_cache_mib`), so alternating templates read each
system message once per process. `llm.reuse_previous_prompt = false` clears the context before
every call (with `prompt_cache_mib = 0`: no reuse at all, for benchmarks).

Errors: everything llama.cpp raises is translated to `EngineError` here. This module must never
log prompt or completion text: they carry patient data. It logs token counts and seconds only.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import llama_cpp
import structlog
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from fhir_adapters.models import ModelIdentity
from service.config import LlmSettings
from service.llm.base import EngineError, Generation, GenerationRequest, generation_of
from service.llm.grammar import chat_params, gbnf_for_schema
from service.llm.model_files import MODEL_PATH_SETTING, context_window, model_identity, resolve_model_path
from service.llm.prefix_cache import PrefixStates, common_prefix_length, fixed_prefix_length
from service.llm.sampling import Candidates, DecodeStats, GrammarSecondSampler

log = structlog.get_logger(__name__)

_DONE = object()


def grammar_for_schema(schema: dict[str, Any]) -> LlamaGrammar:
    """A llama.cpp grammar that only accepts JSON matching `schema`."""
    return LlamaGrammar.from_string(gbnf_for_schema(schema), verbose=False)


def _gguf_metadata(path: Path) -> dict[str, str]:
    """The GGUF's metadata, read with the vocabulary only (no weights, no context)."""
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(vocab.metadata)
    finally:
        vocab.close()


class _ChartbriefLlama(Llama):
    """`Llama` with chartbrief's grammar-second sampler and its per-template prefix states.

    Hooks (all under the engine's native lock): `_init_sampler` (called by `Llama.generate` and
    `Llama.sample`, the only users of `self._sampler`, which only call `.sample(ctx, idx)`),
    `generate` (restore a kept prefix before llama-cpp-python's own prefix match) and `eval`
    (count what is read, and save the fixed prefix on its first reading).
    """

    def __init__(self, *, grammar_sampling: str, prefix_states: PrefixStates, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grammar_sampling = grammar_sampling
        self.prefix_states = prefix_states
        self.stats = DecodeStats()
        # Set by the engine before each call: the text that ends the template's fixed prefix.
        self.fixed_text: bytes | None = None
        self._save_at = 0  # absolute token count at which the first eval of a call saves its prefix
        self._prompt_eval_pending = False
        self._grammar_candidates: Candidates | None = None  # allocated at the first grammar-second call

    # --- sampling ---------------------------------------------------------------------------

    def _init_sampler(self, *args: Any, **kwargs: Any) -> Any:
        grammar: LlamaGrammar | None = kwargs.get("grammar")
        if args or grammar is None or self.grammar_sampling != "grammar-second":
            return super()._init_sampler(*args, **kwargs)
        chain = super()._init_sampler(*args, **{**kwargs, "grammar": None})
        greedy = (
            kwargs.get("temp", 0.8) == 0.0
            and kwargs.get("repeat_penalty", 1.0) == 1.0
            and kwargs.get("frequency_penalty", 0.0) == 0.0
            and kwargs.get("presence_penalty", 0.0) == 0.0
            and kwargs.get("logits_processor") is None
        )
        if self._grammar_candidates is None:
            self._grammar_candidates = Candidates(self._n_vocab)
        return GrammarSecondSampler(
            chain, self._model.vocab, self._grammar_candidates, grammar, greedy=greedy, stats=self.stats
        )

    def release_sampler(self) -> None:
        """Free the last call's native samplers now rather than at the next call."""
        sampler: Any = self._sampler  # llama-cpp-python declares it None, then stores a sampler
        self._sampler = None
        if sampler is not None:
            sampler.close()

    # --- prompt reuse -----------------------------------------------------------------------

    def generate(
        self, tokens: Sequence[int], *args: Any, **kwargs: Any
    ) -> Generator[int, Sequence[int] | None, None]:
        tokens = list(tokens)
        self._save_at = 0
        if self.prefix_states.capacity_bytes > 0:
            shared = common_prefix_length(self._input_ids.tolist(), tokens) if self.n_tokens else 0
            kept = self.prefix_states.longest_prefix_of(tokens)
            if kept is not None and len(kept[0]) > shared:
                self._restore(*kept)
            fixed = fixed_prefix_length(tokens, self._piece, self.fixed_text) if self.fixed_text else 0
            # Saved on its first reading only, and only when the prompt goes on past it.
            if 0 < fixed < len(tokens) and tokens[:fixed] not in self.prefix_states:
                self._save_at = fixed
        self._prompt_eval_pending = True
        return (yield from super().generate(tokens, *args, **kwargs))

    def eval(self, tokens: Sequence[int]) -> None:
        if not self._prompt_eval_pending:  # one sampled token at a time
            super().eval(tokens)
            return
        self._prompt_eval_pending = False
        start, save_at = self.n_tokens, self._save_at
        self.stats.prompt_tokens_evaluated += len(tokens)
        self.stats.prompt_tokens_reused += start
        self._save_at = 0
        if start < save_at < start + len(tokens):
            super().eval(tokens[: save_at - start])
            self._save_prefix()
            super().eval(tokens[save_at - start :])
        else:
            super().eval(tokens)

    def _save_prefix(self) -> None:
        ctx, seq = self._ctx.ctx, 0
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        if size <= 0 or size > self.prefix_states.capacity_bytes:
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq)
        if written and self.prefix_states.put(self._input_ids.tolist(), bytes(buffer)[:written]):
            self.stats.prefix_saves += 1

    def _restore(self, prefix: tuple[int, ...], state: bytes) -> bool:
        memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        if memory is not None:
            llama_cpp.llama_memory_clear(memory, True)
        self.n_tokens = 0
        self._requires_eval = True
        buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if not llama_cpp.llama_state_seq_set_data(self._ctx.ctx, buffer, len(state), 0):
            return False  # the cleared context simply reads the whole prompt
        self.input_ids[: len(prefix)] = prefix
        self.n_tokens = len(prefix)
        self.stats.prefix_restores += 1
        return True

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buffer, len(buffer), 0, True)
        if n < 0:  # a longer piece: -n is the size it needs
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(n, 0)]

    def clear_context(self) -> None:
        """Forget the evaluated tokens, so the next prompt is read from its first token."""
        self.reset()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.release_sampler()
        super().close()


class LlamaCppEngine:
    """An `Engine` backed by one `llama_cpp.Llama` loaded from `settings.model_path` (or the default)."""

    def __init__(self, settings: LlmSettings, *, cache_dir: Path | None = None) -> None:
        path = resolve_model_path(settings)
        started = time.perf_counter()
        # llama.cpp's own default decodes on half the cores; a summary is one request at a time.
        threads = settings.n_threads or os.cpu_count() or 1
        try:
            n_ctx = settings.n_ctx or context_window(settings, _gguf_metadata(path))
            self._llama = _ChartbriefLlama(
                grammar_sampling=settings.grammar_sampling,
                prefix_states=PrefixStates(settings.prompt_cache_mib * 1024 * 1024),
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=settings.n_gpu_layers,
                seed=settings.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"{MODEL_PATH_SETTING}: llama.cpp could not load {path}: {exc}") from exc
        self._identity = model_identity(
            path, settings, metadata=self._llama.metadata, cache_dir=cache_dir, n_ctx=self.n_ctx
        )
        self._lock = asyncio.Lock()
        self._native_lock = threading.Lock()
        self._grammars: dict[str, LlamaGrammar] = {}
        self._reuse_previous_prompt = settings.reuse_previous_prompt
        self._closed = False
        log.info(
            "model_loaded",
            file=self._identity.file_name,
            sha256=self._identity.sha256[:12],
            n_ctx=self.n_ctx,
            n_gpu_layers=settings.n_gpu_layers,
            seconds=round(time.perf_counter() - started, 2),
        )

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def n_ctx(self) -> int:
        return int(self._llama.n_ctx())

    @property
    def stats(self) -> DecodeStats:
        """Counts since the engine was loaded: tokens sampled under a grammar, grammar checks and
        fallbacks, prompt tokens read and reused, template prefixes kept and restored."""
        return self._llama.stats.snapshot()

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes held by the kept template prefixes (at most `llm.prompt_cache_mib`)."""
        return self._llama.prefix_states.size_bytes

    def count_tokens(self, text: str) -> int:
        # special=True: the chat formatter tokenizes prompts the same way, so the budget matches.
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    async def generate(self, request: GenerationRequest) -> Generation:
        kwargs = self._completion_kwargs(request)
        async with self._lock:
            return await asyncio.to_thread(self._generate_blocking, kwargs)

    def _generate_blocking(self, kwargs: dict[str, Any]) -> Generation:
        started = time.perf_counter()
        with self._native_lock:
            self._check_open()
            before = self._llama.stats.snapshot()
            self._prepare_call(kwargs)
            try:
                response = cast(dict[str, Any], self._llama.create_chat_completion(**kwargs))
            except (ValueError, RuntimeError) as exc:
                raise EngineError(f"llama.cpp generation failed: {type(exc).__name__}") from exc
            finally:
                self._llama.release_sampler()
            after = self._llama.stats.snapshot()
        seconds = time.perf_counter() - started
        generation = generation_of(response, seconds)
        log.info(
            "generation_done",
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            seconds=round(seconds, 2),
            finish_reason=generation.finish_reason,
            **_stats_delta(before, after),
        )
        return generation

    def _prepare_call(self, kwargs: dict[str, Any]) -> None:
        """Tell the model where this prompt's fixed prefix ends; clear the context when reuse of
        the previous prompt is off."""
        messages = cast(list[dict[str, str]], kwargs.get("messages", []))
        first = messages[0] if messages else {}
        system = first.get("content") if first.get("role") == "system" else None
        # stripped: chat templates may trim the system message
        self._llama.fixed_text = system.strip().encode("utf-8") if system and system.strip() else None
        if not self._reuse_previous_prompt:
            self._llama.clear_context()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the completion as it is produced, piece by piece."""
        kwargs = self._completion_kwargs(request)
        kwargs["stream"] = True
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancelled.set()

        def produce() -> None:
            try:
                with self._native_lock:
                    self._check_open()
                    self._prepare_call(kwargs)
                    chunks = cast(Iterator[dict[str, Any]], self._llama.create_chat_completion(**kwargs))
                    try:
                        for chunk in chunks:
                            if cancelled.is_set():
                                break
                            piece = chunk["choices"][0].get("delta", {}).get("content")
                            if piece:
                                put(piece)
                    finally:
                        close = getattr(chunks, "close", None)
                        if close is not None:
                            close()
                        self._llama.release_sampler()
            except Exception as exc:  # handed to the reader, who raises it as an EngineError
                put(exc)
            finally:
                put(_DONE)

        async with self._lock:
            worker = asyncio.ensure_future(asyncio.to_thread(produce))
            try:
                while (item := await queue.get()) is not _DONE:
                    if isinstance(item, EngineError):
                        raise item
                    if isinstance(item, Exception):
                        raise EngineError(f"llama.cpp generation failed: {type(item).__name__}") from item
                    yield cast(str, item)
            finally:
                # Stop the native loop at the next token and wait for it, so the lock is only
                # released once the model is really free.
                cancelled.set()
                await asyncio.shield(worker)

    async def aclose(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        with self._native_lock:
            if not self._closed:
                self._closed = True
                self._llama.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the model engine was closed")

    def _completion_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        kwargs = chat_params(request)
        if request.json_schema is not None:
            kwargs["grammar"] = self._grammar(request.json_schema)
        return kwargs

    def _grammar(self, schema: dict[str, Any]) -> LlamaGrammar:
        # The parsed grammar is reused too: batch jobs send the same schema thousands of times.
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            if len(self._grammars) > 32:
                self._grammars.clear()
            grammar = self._grammars[key] = grammar_for_schema(schema)
        return grammar


def _stats_delta(before: DecodeStats, after: DecodeStats) -> dict[str, int]:
    """The counts one call added (grammar checks, fallbacks, prompt tokens read/reused...)."""
    return {name: value - getattr(before, name) for name, value in vars(after).items()}
