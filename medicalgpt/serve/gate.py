"""What every HTTP request passes before the app sees it: the API key (401) and the body size (413), as plain ASGI
middleware (Starlette's BaseHTTPMiddleware wraps `receive`, which would hide a client's disconnect from the
routes). A body without Content-Length (chunked) is read here up to the limit and handed on."""

import hmac
import json


class Gate:
    def __init__(self, app, api_key=None, max_body_bytes=4 * 1024 * 1024):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            message = "Invalid or missing API key (send Authorization: Bearer KEY)"
            return await refuse(send, 401, message, "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await refuse(send, 400, "Content-Length is not a number")
            if int(length) > self.max_body_bytes:
                return await refuse(send, 413, self.too_large(int(length)), "request_too_large")
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            body, receive = await self.read_body(receive)
            if body is None:
                return await refuse(send, 413, self.too_large(), "request_too_large")
        await self.app(scope, receive, send)

    def too_large(self, size=None):
        given = f" ({size} bytes)" if size is not None else ""
        return f"The request body{given} is larger than this server's limit of {self.max_body_bytes} bytes"

    async def read_body(self, receive):
        """(the body, a receive that replays it) or (None, _) when it grows past the limit."""
        chunks, size, message = [], 0, {"type": "http.request", "more_body": True}
        while message.get("type") == "http.request" and message.get("more_body", False):
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None, receive
        if message.get("type") != "http.request":  # the client left while sending: the app sees it leave
            return b"", receive
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return body, replay


async def refuse(send, status, message, code=None):
    kind = "invalid_request_error" if status != 401 else "authentication_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
