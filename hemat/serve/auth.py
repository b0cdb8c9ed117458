"""Guards at the door, as plain ASGI middleware so they run before routing and body parsing: the API key
(`Authorization: Bearer KEY`, compared in constant time) and the request body size limit."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from hemat.serve.protocol import error_body

PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)  # the web chat page and its assets: the user types the key into the page


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


class ApiKeyMiddleware:
    """401 for every non-public path unless the request carries the key. With api_key None: open."""

    def __init__(self, app, api_key: str | None, public: Callable[[str], bool] = is_public):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.public = public

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.key is None or self.public(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest on every request, whatever the scheme, so timing says nothing about the key
        valid = hmac.compare_digest(token.strip(), self.key) and scheme.lower() == b"bearer"
        if not valid:
            message = ("Incorrect API key provided." if header else
                       "Missing API key: send it as the header 'Authorization: Bearer KEY'.")
            body = error_body(message, "invalid_request_error", None, "invalid_api_key")
            return await send_json(send, 401, body, {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for request bodies over max_bytes. The body is read here in full (FastAPI would read it all
    anyway) and replayed to the app; later receive() calls pass through so disconnects are still seen."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = error_body(f"request body is larger than the server's limit of {self.max_bytes} bytes",
                               "invalid_request_error", None, "request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_json(send, 413, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_json(send, 413, too_large)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
