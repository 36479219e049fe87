"""The evaluated KV state of each prompt template's fixed prefix, kept so it is read once per process.

llama-cpp-python already reuses the context for the longest prefix the next prompt shares with the
*previous* one. chartbrief alternates templates (the coded summary, one call per clinical note,
the review screen's calls), so every switch of template would read its system message again. The
engine therefore saves the context right after a template's fixed prefix (the chat template's
opening and the system message) the first time it reads it, and restores it when a later prompt
starts with the same tokens and the current context shares less with it.

A state is the KV cache of one sequence, not the model's logits: for SmolLM2-135M about 23 KiB per
token, so a 250-token system prefix is about 6 MiB. The store is bounded in bytes
(`llm.prompt_cache_mib`) and forgets the least recently used prefix first.

Pure data here (token tuples and bytes); the native save and restore live in `llamacpp.py`.
This module never logs: its keys are tokens, and tokens are prompt text.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Sequence


class PrefixStates:
    """An LRU of (prefix tokens -> saved KV state), bounded by the bytes of the states."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._states: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, prefix: Sequence[int]) -> bool:
        return tuple(prefix) in self._states

    def put(self, prefix: Sequence[int], state: bytes) -> bool:
        """Keep `state` for `prefix`; False (nothing kept) when one state alone exceeds the capacity.

        >>> store = PrefixStates(capacity_bytes=10)
        >>> store.put([1, 2], b"abcdef"), store.put([3], b"ghijkl"), len(store), [3] in store
        (True, True, 1, True)
        >>> store.put([4], b"x" * 11), len(store)
        (False, 1)
        """
        key = tuple(prefix)
        if len(state) > self.capacity_bytes or not key:
            return False
        old = self._states.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
        while self._states and self._bytes + len(state) > self.capacity_bytes:
            _, evicted = self._states.popitem(last=False)
            self._bytes -= len(evicted)
        self._states[key] = state
        self._bytes += len(state)
        return True

    def longest_prefix_of(self, tokens: Sequence[int]) -> tuple[tuple[int, ...], bytes] | None:
        """The kept prefix that `tokens` starts with, the longest one (and mark it recently used).

        >>> store = PrefixStates(capacity_bytes=100)
        >>> _ = store.put([1, 2], b"a"), store.put([1, 2, 3], b"b"), store.put([9], b"c")
        >>> store.longest_prefix_of([1, 2, 3, 4])
        ((1, 2, 3), b'b')
        >>> store.longest_prefix_of([1, 5]) is None
        True
        """
        best: tuple[int, ...] | None = None
        for key in self._states:
            if (
                len(key) <= len(tokens)
                and (best is None or len(key) > len(best))
                and _starts_with(tokens, key)
            ):
                best = key
        if best is None:
            return None
        self._states.move_to_end(best)
        return best, self._states[best]

    def clear(self) -> None:
        self._states.clear()
        self._bytes = 0


def _starts_with(tokens: Sequence[int], prefix: tuple[int, ...]) -> bool:
    return tuple(tokens[: len(prefix)]) == prefix


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share.

    >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5]), common_prefix_length([], [1])
    (2, 0)
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def fixed_prefix_length(tokens: Sequence[int], piece: Callable[[int], bytes], fixed_text: bytes) -> int:
    """How many leading tokens lie wholly within the prompt text up to the end of `fixed_text`'s
    first occurrence (the system message); 0 when the rendered prompt does not contain it.

    Only tokens that end at or before that point count, so the prefix never includes a token that
    also spells the start of the varying part.

    >>> pieces = {1: b"<s>", 2: b"You ", 3: b"help.", 4: b"\\n", 5: b"Q: hi"}
    >>> fixed_prefix_length([1, 2, 3, 4, 5], pieces.__getitem__, b"You help.")
    3
    >>> fixed_prefix_length([1, 2, 3], pieces.__getitem__, b"other")
    0
    """
    if not fixed_text:
        return 0
    ends: list[int] = []
    text = bytearray()
    for token in tokens:
        added = piece(token)
        text += added
        ends.append(len(text))
        # a new occurrence ends inside the piece just added
        found = text.find(fixed_text, max(0, len(text) - len(added) - len(fixed_text) + 1))
        if found >= 0:
            return bisect.bisect_right(ends, found + len(fixed_text))
    return 0
