"""A fault-injecting HTTP proxy for S3 on loopback: in front of moto's server, it answers a share of requests with
503 SlowDown or drops the connection (before forwarding, or after, so the request took effect but its answer is
lost). The faults are drawn from a seeded generator; the counts say what was injected. It can also slow every
request down (``delay``) and deny access to some keys (``deny``: 403 for paths containing any of those strings)."""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections import Counter
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
    ):
        self.delay, self.deny = delay, deny
        self.upstream = urlsplit(upstream)
        self.rates = {"slow_down": slow_down, "drop_before": drop_before, "drop_after": drop_after}
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
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

    def _draw(self) -> str:
        with self.lock:
            self.counts["requests"] += 1
            if not self.enabled:
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
                fault = proxy._draw()
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
