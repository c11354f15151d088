"""Plain HTTP on the WebSocket port: the ticker page, ``/healthz``, ``/readyz`` and ``/metrics``.

Only GET and HEAD of a few known things; one request per connection (websockets closes after a non-101
response). Every response carries ``X-Content-Type-Options: nosniff``; pages also ``X-Frame-Options: DENY``
and a CSP with ``frame-ancestors 'none'``.
"""

from __future__ import annotations

import http
import json
import mimetypes
import sys
from collections.abc import Callable
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["DEFAULT_WEB_ROOT", "HttpResponder"]

def _default_web_root() -> Path:
    """The checkout's ``web/`` folder, else the copy ``pip install .`` puts under ``share/``."""
    checkout = Path(__file__).resolve().parent.parent.parent / "web"
    if (checkout / "index.html").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "stomp-ws-gateway" / "web"


DEFAULT_WEB_ROOT = _default_web_root()

CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}
MAX_STATIC_FILE = 8 * 1024 * 1024


def _response(
    status: http.HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None
) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Cache-Control"] = "no-cache"
    headers["Connection"] = "close"
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status.value, status.phrase, headers, body)


class HttpResponder:
    """Answers non-WebSocket requests.

    ``/healthz`` is liveness: 200 whenever the process answers at all (an orchestrator restarts a gateway
    that stops answering, never one that waits for its broker). ``/readyz`` is readiness: 200 while
    ``ready()`` gives no reason not to take clients (the broker is reachable, the gateway is not shutting
    down), else 503 with that reason.
    """

    def __init__(
        self,
        web_root: Path | None,
        ready: Callable[[], str | None],
        metrics: Callable[[], bytes] | None = None,
        info: Callable[[], dict[str, object]] | None = None,
    ):
        self.web_root = web_root.resolve() if web_root is not None else None
        self.ready = ready
        self.metrics = metrics
        self.info = info

    def respond(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _response(http.HTTPStatus.OK, b"OK\n", "text/plain; charset=utf-8")
        if path == "/readyz":
            reason = self.ready()
            if reason is None:
                return _response(http.HTTPStatus.OK, b"ready\n", "text/plain; charset=utf-8")
            return _response(
                http.HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {reason}\n".encode(), "text/plain; charset=utf-8"
            )
        if path == "/info.json" and self.info is not None:
            # What the page may know about the gateway: never hosts, ports, users or URLs.
            body = json.dumps(self.info()).encode()
            return _response(http.HTTPStatus.OK, body, "application/json")
        if path == "/metrics" and self.metrics is not None:
            return _response(http.HTTPStatus.OK, self.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/ws":
            return _response(
                http.HTTPStatus.UPGRADE_REQUIRED,
                b"This is a STOMP-over-WebSocket endpoint: connect with a WebSocket client.\n",
                "text/plain; charset=utf-8",
                {"Upgrade": "websocket"},
            )
        return self._static(path)

    def _static(self, path: str) -> Response:
        not_found = _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")
        if self.web_root is None:
            return not_found
        if path.endswith("/"):
            path += "index.html"
        relative = path.lstrip("/")
        if "\x00" in relative or "\\" in relative:
            return not_found
        candidate = (self.web_root / relative).resolve()
        if not candidate.is_relative_to(self.web_root) or not candidate.is_file():
            return not_found
        if any(
            part.startswith(".") or part == "node_modules"
            for part in candidate.relative_to(self.web_root).parts
        ):
            return not_found
        if candidate.stat().st_size > MAX_STATIC_FILE:
            return not_found
        content_type = TYPES.get(candidate.suffix.lower()) or mimetypes.guess_type(candidate.name)[0]
        if content_type is None:
            content_type = "application/octet-stream"
        extra = {}
        if content_type.startswith("text/html"):
            extra = {
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": CSP,
                "Referrer-Policy": "no-referrer",
            }
        return _response(http.HTTPStatus.OK, candidate.read_bytes(), content_type, extra)
