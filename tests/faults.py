"""A fault-injecting HTTP proxy for S3 on loopback: in front of moto's server, it answers a share of requests with
503 SlowDown or drops the connection (before forwarding, or after, so the request took effect but its answer is
lost). The faults are drawn from a seeded generator; the counts say what was injected. It can also slow every
request down (``delay``) and deny access to some keys (``deny``: 403 for paths containing any of those strings).

``only`` (a function of the method and the path) limits the faults to the requests it picks:
``FaultProxy(url, drop_after=1.0, only=FirstTry("PUT", "/_delta_log/"))`` fails the first PUT of every Delta log
entry and no other request. ``log`` holds (method, path, what was done) for every request, in the order they came.

:class:`FaultProxyProcess` runs the same proxy in a process of its own, for a client that holds the GIL while it
waits for an answer (delta-rs's ``DeltaTable.is_deltatable`` does): a proxy thread in the client's process would never
get to answer it."""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        slow_down: float = 0.0,
        drop_before: float = 0.0,
        drop_after: float = 0.0,
        seed: int = 0,
        delay: float = 0.0,
        deny: tuple[str, ...] = (),
        only: Callable[[str, str], bool] | None = None,
    ):
        self.delay, self.deny = delay, deny
        self.upstream = urlsplit(upstream)
        self.rates = {"slow_down": slow_down, "drop_before": drop_before, "drop_after": drop_after}
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []
        self.only = only
        self.enabled = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self, method: str = "", path: str = "") -> str:
        with self.lock:
            self.counts["requests"] += 1
            fault = self._pick(method, path)
            self.log.append((method, path, fault))
            return fault

    def _pick(self, method: str, path: str) -> str:
        if not self.enabled or (self.only is not None and not self.only(method, path)):
            return "pass"
        roll, edge = self.random.random(), 0.0
        for fault, rate in self.rates.items():
            edge += rate
            if roll < edge:
                self.counts[fault] += 1
                return fault
        return "pass"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _drop(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _error(self, status: int, reason: str, body: bytes) -> None:
                self.send_response(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._draw(self.command, self.path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fault == "drop_before":
                    return self._drop()
                if fault == "slow_down":
                    return self._error(503, "Slow Down", SLOW_DOWN)
                if any(part in self.path for part in proxy.deny):
                    return self._error(403, "Forbidden", ACCESS_DENIED)
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if fault == "drop_after":
                    return self._drop()
                self.send_response(response.status, response.reason)
                head = self.command == "HEAD"  # its Content-Length is the object's size: pass it through
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        return Handler


@dataclass
class FirstTry:
    """An ``only`` for the proxy: the first request of each (method, path) with ``part`` in its path and ending in
    ``suffix``; the retries of that same request are let through. Picklable, for :class:`FaultProxyProcess`."""

    method: str
    part: str
    suffix: str = ""
    seen: set[tuple[str, str]] = field(default_factory=set)

    def __call__(self, method: str, path: str) -> bool:
        if method != self.method or self.part not in path or not path.endswith(self.suffix):
            return False
        if (method, path) in self.seen:
            return False
        self.seen.add((method, path))
        return True


class FaultProxyProcess:
    """:class:`FaultProxy` (same arguments; ``only`` must be picklable) served from a spawned process. ``endpoint``
    is known inside the ``with``; ``counts`` and ``log`` once it is left."""

    def __init__(self, upstream: str, **options):
        self.upstream, self.options = upstream, options
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []

    def __enter__(self) -> FaultProxyProcess:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(self.upstream, self.options, child), daemon=True)
        self._process.start()
        if not self._connection.poll(60):
            self._process.kill()
            raise RuntimeError("the fault proxy's process did not start")
        self.endpoint = self._connection.recv()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._connection.send("stop")
            if self._connection.poll(30):
                counts, self.log = self._connection.recv()
                self.counts = Counter(counts)
        finally:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()


def _serve(upstream: str, options: dict, connection) -> None:
    with FaultProxy(upstream, **options) as proxy:
        connection.send(proxy.endpoint)
        connection.recv()
        with proxy.lock:
            connection.send((dict(proxy.counts), list(proxy.log)))
