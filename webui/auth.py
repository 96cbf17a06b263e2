"""Access token for the web app, as Jupyter does it: a random token in the URL printed at
launch; the first visit trades it for an HttpOnly cookie. API clients send
`Authorization: Bearer <token>`. Without it, other users of a shared machine could drive the
API on 127.0.0.1 (train, read files). `--no-auth` turns it off."""

from __future__ import annotations

import hmac
import secrets
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlencode

COOKIE = "lorastudio_token"
STARTUP_PATH = "/gradio_api/startup-events"


def new_token() -> str:
    return secrets.token_urlsafe(24)


class TokenMiddleware:
    """Pure ASGI middleware (works for streaming responses and websockets alike)."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token

    def _ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate, self.token)

    async def __call__(self, scope, receive, send):
        # Gradio's launch() calls its own startup-events route (that exact path) before printing the URL
        if scope["type"] not in ("http", "websocket") or scope.get("path") == STARTUP_PATH:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookie = SimpleCookie(headers.get("cookie", ""))
        bearer = headers.get("authorization", "")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = (query.get("token") or [None])[0]
        if self._ok(cookie[COOKIE].value if COOKIE in cookie else None) or \
                self._ok(bearer[7:] if bearer.lower().startswith("bearer ") else None):
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and self._ok(from_query):
            # trade the token for a cookie and drop it from the address bar
            rest = urlencode({k: v for k, v in query.items() if k != "token"}, doseq=True)
            location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
            await send({"type": "http.response.start", "status": 303, "headers": [
                (b"location", location.encode("latin-1")),
                (b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1"))]})
            return await send({"type": "http.response.body", "body": b""})
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = (b"LoRA Studio needs its access token: open the URL with ?token=... that `lorastudio` printed "
                b"in its terminal (or start it with --no-auth).\n")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
        await send({"type": "http.response.body", "body": body})


def middleware(token: str):
    from starlette.middleware import Middleware

    return Middleware(TokenMiddleware, token=token)
