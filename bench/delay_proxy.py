"""A reverse proxy that adds a fixed delay to every request, to measure a FHIR client over a slow link.

A local FHIR server answers in a millisecond or two, so a client that sends its requests one after
another looks as fast as one that sends them side by side. A real EHR is tens of milliseconds away.
`DelayProxy` stands in for that distance: it listens on 127.0.0.1 (a free port), waits `delay`
seconds, forwards the request to the upstream FHIR base (httpx), and answers with the upstream's
status, headers and body. Absolute URLs of the upstream base in a body (a Bundle's `next` link, an
entry's `fullUrl`) and in `Location` headers are rewritten to the proxy's base, so paging goes
through the proxy too. Each request waits on its own: ten concurrent requests cost one delay, ten
sequential ones ten.

It runs its own asyncio loop in a daemon thread (`with DelayProxy(base) as proxy:`), so sync code
and other event loops can point at `proxy.base_url`; it counts the requests it answered, and the
most it had in flight at once. `DelayProxyProcess` runs the same proxy in a child process (its
counters read over `/__delay_proxy__/stats`), so that its work does not slow the client measured.

What it must not do: listen on anything but the loopback address, change a request, or change a
body except for those URLs.

    python -m bench.delay_proxy http://127.0.0.1:8080/fhir --delay-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

HOST = "127.0.0.1"
DEFAULT_DELAY_SECONDS = 0.050
# Headers of one hop only; Content-Length is recomputed (a rewritten body changes length) and the
# body is forwarded decoded, so Content-Encoding no longer applies.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "content-encoding",
        "host",
    }
)
URL_HEADERS = ("location", "content-location")
# Answered by the proxy itself, for the process that started it: no FHIR path starts with it.
CONTROL_PATH = "/__delay_proxy__"
MAX_HEADER_BYTES = 64 * 1024
REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found", 502: "Bad Gateway"}


class ProxyError(RuntimeError):
    """The proxy could not start, or was used before it started."""


def origin_and_path(base: str) -> tuple[str, str]:
    """A base URL's origin and path without a trailing slash.

    >>> origin_and_path("http://127.0.0.1:8080/fhir/")
    ('http://127.0.0.1:8080', '/fhir')
    """
    url = httpx.URL(base)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"upstream {base!r} must be an absolute http(s) URL")
    return f"{url.scheme}://{url.netloc.decode('ascii')}", url.path.rstrip("/")


def rewrite_urls(body: bytes, upstream_base: str, proxy_base: str) -> bytes:
    """`body` with every absolute URL under `upstream_base` moved under `proxy_base`.

    Only whole bases are replaced: `http://h:80/fhir` is not a prefix of `http://h:8080/fhir` nor of
    `http://h:80/fhirx`. JSON's escaped slashes (`http:\\/\\/h`) are rewritten as well.

    >>> rewrite_urls(b'{"url": "http://h:80/fhir/Observation?page=2"}', "http://h:80/fhir", "http://p:1/fhir")
    b'{"url": "http://p:1/fhir/Observation?page=2"}'
    >>> rewrite_urls(b'"http://h:8080/fhir/x" "http://h:80/fhirx"', "http://h:80/fhir", "http://p:1/fhir")
    b'"http://h:8080/fhir/x" "http://h:80/fhirx"'
    """
    upstream = upstream_base.rstrip("/")
    proxy = proxy_base.rstrip("/")
    for old, new in ((upstream, proxy), (upstream.replace("/", "\\/"), proxy.replace("/", "\\/"))):
        old_bytes = old.encode()
        if old_bytes not in body:
            continue
        # The base ends where a path, query, fragment, string or the body ends.
        pattern = re.escape(old_bytes) + rb'(?=[/?#"\\\s<]|$)'
        replacement = new.encode()
        body = re.sub(pattern, lambda _match, new=replacement: new, body)
    return body


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool


class DelayProxy:
    """The proxy; `with DelayProxy(upstream, delay=0.05) as proxy:` starts it, leaving the block stops it."""

    def __init__(self, upstream: str, *, delay: float = DEFAULT_DELAY_SECONDS, timeout: float = 60.0) -> None:
        if delay < 0:
            raise ValueError(f"delay must be at least 0 seconds, got {delay}")
        self.upstream = upstream.rstrip("/")
        self._upstream_origin, self._path = origin_and_path(self.upstream)
        self.delay = delay
        self.timeout = timeout
        self.port: int | None = None
        self._lock = threading.Lock()
        self._requests = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._delayed_seconds = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._startup_error: BaseException | None = None

    # -- what callers read ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ProxyError("the delay proxy is not running")
        return f"http://{HOST}:{self.port}{self._path}"

    @property
    def requests(self) -> int:
        """Requests answered (forwarded or not) since the start or the last `reset()`."""
        with self._lock:
            return self._requests

    @property
    def max_in_flight(self) -> int:
        """The most requests the proxy held at once since the start or the last `reset()`."""
        with self._lock:
            return self._max_in_flight

    @property
    def delayed_seconds(self) -> float:
        """The delay actually slept, summed over the requests (at least requests x delay)."""
        with self._lock:
            return self._delayed_seconds

    def reset(self) -> None:
        """Zero the counters (between two measurements)."""
        with self._lock:
            self._requests = 0
            self._max_in_flight = self._in_flight
            self._delayed_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Start the proxy's thread and return its base URL once it listens."""
        if self._thread is not None:
            return self.base_url
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._startup_error is not None:
            self.stop()
            raise ProxyError(f"the delay proxy did not start: {self._startup_error!r}")
        return self.base_url

    def stop(self) -> None:
        """Close the listener and open connections, end the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(10)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        self._thread = None
        self._loop = None
        self.port = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
        except OSError as exc:
            self._startup_error = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _listen(self) -> None:
        # The proxy's own pool: enough connections that it never serializes a concurrent client.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._server = await asyncio.start_server(self._connection, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if self._client is not None:
            await self._client.aclose()

    # -- one connection ----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if request.target.startswith(CONTROL_PATH):
                    status, headers, body = self._control(request)
                else:
                    status, headers, body = await self._answer(request)
                await _write_response(writer, status, headers, body, keep_alive=request.keep_alive)
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return
        except asyncio.CancelledError:
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    def _control(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        """The counters for a `DelayProxyProcess` in another process (not forwarded, not counted)."""
        if request.method == "POST" and request.target == f"{CONTROL_PATH}/reset":
            self.reset()
        elif request.method != "GET" or request.target != f"{CONTROL_PATH}/stats":
            return 404, [("Content-Type", "text/plain")], b"unknown control request"
        stats = {
            "requests": self.requests,
            "max_in_flight": self.max_in_flight,
            "delayed_seconds": self.delayed_seconds,
        }
        return 200, [("Content-Type", "application/json")], json.dumps(stats).encode()

    async def _answer(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            started = time.perf_counter()
            await asyncio.sleep(self.delay)
            slept = time.perf_counter() - started
            status, headers, body = await self._forward(request)
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            self._requests += 1
            self._delayed_seconds += slept
        return status, headers, body

    async def _forward(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._client is not None  # noqa: S101 - set before the listener accepts anything
        # The body is read decoded, so the upstream is asked for none of the encodings.
        headers = [
            (k, v)
            for k, v in request.headers
            if k.lower() not in HOP_BY_HOP and k.lower() != "accept-encoding"
        ]
        try:
            response = await self._client.request(
                request.method,
                self._upstream_origin + request.target,
                headers=headers,
                content=request.body or None,
            )
        except httpx.HTTPError as exc:
            return (
                502,
                [("Content-Type", "text/plain")],
                f"upstream unreachable: {type(exc).__name__}".encode(),
            )
        proxy_base = self.base_url
        out: list[tuple[str, str]] = []
        for key, value in response.headers.multi_items():
            if key.lower() in HOP_BY_HOP:
                continue
            if key.lower() in URL_HEADERS:
                value = rewrite_urls(value.encode(), self.upstream, proxy_base).decode()
            out.append((key, value))
        return response.status_code, out, rewrite_urls(response.content, self.upstream, proxy_base)


class DelayProxyProcess:
    """`DelayProxy` in a child process (`python -m bench.delay_proxy`), with the same counters.

    A benchmark that times a client in this process measures it without the proxy's own CPU work
    (forwarding, rewriting) competing for this process's interpreter, as a real network would not.
    """

    def __init__(
        self, upstream: str, *, delay: float = DEFAULT_DELAY_SECONDS, startup_timeout: float = 20.0
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be at least 0 seconds, got {delay}")
        origin_and_path(upstream)
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.startup_timeout = startup_timeout
        self._base_url: str | None = None
        self._process: subprocess.Popen[str] | None = None
        self._control: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise ProxyError("the delay proxy is not running")
        return self._base_url

    def _stats(self) -> dict[str, float]:
        if self._control is None:
            raise ProxyError("the delay proxy is not running")
        response = self._control.get(f"{CONTROL_PATH}/stats")
        response.raise_for_status()
        stats: dict[str, float] = response.json()
        return stats

    @property
    def requests(self) -> int:
        return int(self._stats()["requests"])

    @property
    def max_in_flight(self) -> int:
        return int(self._stats()["max_in_flight"])

    @property
    def delayed_seconds(self) -> float:
        return float(self._stats()["delayed_seconds"])

    def reset(self) -> None:
        if self._control is None:
            raise ProxyError("the delay proxy is not running")
        self._control.post(f"{CONTROL_PATH}/reset").raise_for_status()

    def start(self) -> str:
        if self._process is not None:
            return self.base_url
        command = [
            sys.executable,
            "-m",
            "bench.delay_proxy",
            self.upstream,
            "--delay-ms",
            str(self.delay * 1000),
        ]
        # The repository root, so that `bench` is importable whatever the working directory.
        root = str(Path(__file__).resolve().parents[1])
        self._process = subprocess.Popen(  # noqa: S603 - this interpreter, arguments built here
            command, cwd=root, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        first_line: list[str] = []
        stdout = self._process.stdout
        reader = threading.Thread(
            target=lambda: first_line.append(stdout.readline() if stdout else ""), daemon=True
        )
        reader.start()
        reader.join(self.startup_timeout)
        line = first_line[0].strip() if first_line else ""
        if not line.startswith("http://"):
            self.stop()
            raise ProxyError(f"the delay proxy process did not start (first line {line!r})")
        self._base_url = line.split()[0]
        origin, _ = origin_and_path(self._base_url)
        self._control = httpx.Client(base_url=origin, timeout=10)
        return self._base_url

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        process = self._process
        if process is not None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
        self._process = None
        self._base_url = None

    def __enter__(self) -> DelayProxyProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """One HTTP/1.1 request, or None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    fields = {k.lower(): v for k, v in headers}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        length = int(fields.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
    connection = fields.get("connection", "").lower()
    keep_alive = connection != "close" if version.upper() == "HTTP/1.1" else connection == "keep-alive"
    return _Request(method.upper(), target, headers, body, keep_alive)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _write_response(
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    keep_alive: bool,
) -> None:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("upstream", help="the FHIR base to forward to, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_SECONDS * 1000)
    args = parser.parse_args()
    stop = threading.Event()
    # SIGTERM (DelayProxyProcess.stop) ends it like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with DelayProxy(args.upstream, delay=args.delay_ms / 1000) as proxy:
        # The first line is the proxy's base URL: DelayProxyProcess reads it.
        print(f"{proxy.base_url} -> {proxy.upstream} (+{args.delay_ms:g} ms a request)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass


if __name__ == "__main__":
    main()
