"""`--api-key`: every route but /health, /version and /metrics asks for `Authorization: Bearer KEY` (401 otherwise)."""

import hmac
from typing import Any

from .http_limits import Receive, Scope, Send, header_value, send_error

# Open without a key: probes (load balancers, orchestrators), what a client checks before it has a key, and the
# Prometheus scrape (as vLLM's, whose key guards /v1 only; scrapers are configured apart from API clients).
OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (the scheme in any case), or None."""
    value = header_value(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class ApiKeyMiddleware:
    """Refuses a request to a protected route without the right bearer token, before its body is read.

    Every route is protected but OPEN_PATHS (an allow-list: a route added later, or one FastAPI adds such as
    /docs, is protected too). Keys are compared in constant time.
    """

    def __init__(self, app: Any, api_key: str):
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = bearer_token(scope)
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS or (
                token is not None and hmac.compare_digest(token, self._key)):
            await self.app(scope, receive, send)
            return
        message = "no API key: send the header 'Authorization: Bearer <key>'" if token is None else "invalid API key"
        # The connection closes when a request body may follow (it is not read).
        length = header_value(scope, b"content-length")
        close = header_value(scope, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0")
        await send_error(send, 401, message, close, "invalid_api_key", ((b"www-authenticate", b"Bearer"),))
