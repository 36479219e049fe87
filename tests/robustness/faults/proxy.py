"""A fault-injecting HTTP/1.1 proxy in front of a real FHIR server, for tests.

It runs its own asyncio loop in a daemon thread, so sync tests, CliRunner and subprocesses can all
point at `proxy.base_url`. Every request is forwarded to the upstream server (httpx) unless a
`Fault` armed on the proxy matches it; absolute upstream URLs in response bodies (a Bundle's
`next` link, a `Location`) are rewritten to the proxy's, so paging stays behind the proxy.

Faults are armed per test (`proxy.arm(Fault(...))`) and cleared with `proxy.clear()`; each fires on
the matching requests after `skip` of them, `times` times (None: every time). What it must not do:
listen on anything but 127.0.0.1, or touch the upstream server except by forwarding requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import httpx

Kind = Literal[
    "latency",
    "reset",
    "429",
    "500",
    "503",
    "truncated",
    "invalid_json",
    "slow_body",
    "wrong_content_type",
    "hold",
    "drop_after_forward",
    "stop",
]
KINDS: tuple[Kind, ...] = (
    "latency",
    "reset",
    "429",
    "500",
    "503",
    "truncated",
    "invalid_json",
    "slow_body",
    "wrong_content_type",
    "hold",
    "drop_after_forward",
    "stop",
)
REASONS = {
    200: "OK",
    201: "Created",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
OUTCOME = json.dumps(
    {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
).encode()
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class Fault:
    """One fault: what it does, which requests it hits, how often.

    `method` / `path` narrow the requests it matches (`path` is a substring of the request target);
    `skip` lets that many matching requests through first; `times` is how many it hits (None: all).
    `seconds` is the delay for latency / slow_body / 429's Retry-After.
    """

    kind: Kind
    method: str | None = None
    path: str | None = None
    skip: int = 0
    times: int | None = 1
    seconds: float = 0.2
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.path is None or self.path in target

    def take(self, method: str, target: str) -> bool:
        """Whether this fault hits this request (counting it either way)."""
        if not self.matches(method, target):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class FaultProxy:
    """The proxy; use as a context manager (`with FaultProxy(upstream) as proxy:`)."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: bool = False

    @property
    def base_url(self) -> str:
        path = httpx.URL(self.upstream).path.rstrip("/")
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def _origin(self) -> str:
        url = httpx.URL(self.upstream)
        return f"{url.scheme}://{url.netloc.decode()}"

    def arm(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self._stopped = False
        self.held.clear()
        self.release.set()
        self.release = threading.Event()

    def _pick(self, method: str, target: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, target))
            if self._stopped:
                self.injected["stop"] += 1
                return Fault("stop")
            for fault in self.faults:
                if fault.take(method, target):
                    self.injected[fault.kind] += 1
                    if fault.kind == "stop":
                        self._stopped = True
                    return fault
        return None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self._start(ready))
            loop.run_forever()
            loop.run_until_complete(self._client.aclose())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        loop = self._loop
        if loop is not None:

            async def close() -> None:
                self._server.close()
                loop.stop()

            asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(10)

    async def _start(self, ready: threading.Event) -> None:
        self._client = httpx.AsyncClient(timeout=60)
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()

    # -- one connection ---------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if not await self._answer(request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, request: _Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be dropped."""
        fault = self._pick(request.method, request.target)
        kind = fault.kind if fault else None
        if kind in ("reset", "stop"):
            writer.transport.abort()
            return False
        if kind == "429":
            await _write(writer, 429, [("Retry-After", str(max(1, round(fault.seconds))))], OUTCOME)  # type: ignore[union-attr]
            return True
        if kind in ("500", "503"):
            await _write(writer, int(kind), [], OUTCOME)
            return True
        if kind == "invalid_json":
            await _write(
                writer,
                200,
                [("Content-Type", "application/fhir+json")],
                b'{"resourceType": "Bundle", "entry": [',
            )
            return True
        if kind == "wrong_content_type":
            await _write(
                writer, 200, [("Content-Type", "text/html")], b"<html><body>Maintenance</body></html>"
            )
            return True
        if kind == "latency":
            await asyncio.sleep(fault.seconds)  # type: ignore[union-attr]
        if kind == "hold":
            self.held.set()
            release = self.release
            await asyncio.get_running_loop().run_in_executor(None, release.wait, 120)
        status, headers, body = await self._forward(request)
        if kind == "drop_after_forward":
            writer.transport.abort()
            return False
        if kind == "truncated":
            head = _head(status, headers, len(body))
            writer.write(head + body[: max(1, len(body) // 2)])
            await writer.drain()
            writer.transport.abort()
            return False
        if kind == "slow_body":
            writer.write(_head(status, headers, len(body)))
            step = max(1, len(body) // 8)
            for start in range(0, len(body), step):
                writer.write(body[start : start + step])
                await writer.drain()
                await asyncio.sleep(fault.seconds / 8)  # type: ignore[union-attr]
            return True
        await _write(writer, status, headers, body)
        return True

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        response = await self._client.request(
            request.method, self._origin + request.target, headers=headers, content=request.body
        )
        mine = f"http://127.0.0.1:{self.port}".encode()
        body = response.content.replace(self._origin.encode(), mine)
        out = []
        for k, v in response.headers.multi_items():
            if k.lower() in HOP_BY_HOP:
                continue
            out.append((k, v.replace(self._origin, mine.decode())))
        return response.status_code, out, body


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    return _Request(method, target, headers, body)


def _head(status: int, headers: list[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    if not any(k.lower() == "content-type" for k, _ in headers):
        headers = [*headers, ("Content-Type", "application/fhir+json")]
    writer.write(_head(status, headers, len(body)) + body)
    await writer.drain()
