"""Health and readiness over HTTP for orchestrators (``fedfm server --health [HOST:]PORT``).

``/healthz`` answers 200 while the server process runs (a Kubernetes liveness probe);
``/readyz`` answers 200 once the gRPC port listens for clients and 503 before (loading the model
and data) and after the run has ended (a readiness probe: no traffic to a server that cannot take
it). Nothing else is served; nothing about the run is said.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Health:
    def __init__(self) -> None:
        self.ready = False

    def serve(self, address: str) -> tuple[ThreadingHTTPServer, int]:
        """Serve ``/healthz`` and ``/readyz`` on ``address`` (``PORT`` or ``HOST:PORT``; default host
        127.0.0.1; port 0 picks one) in a daemon thread → (server, port)."""
        host, _, port = address.rpartition(":")
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/healthz":
                    self._say(200, "ok")
                elif self.path == "/readyz":
                    self._say(200, "ready") if health.ready else self._say(503, "not ready")
                else:
                    self._say(404, "not found")

            def _say(self, code: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every few seconds: not worth a log line
                pass

        server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="fedfm-health").start()
        return server, server.server_address[1]
