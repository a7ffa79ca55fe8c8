"""What every request passes before the app sees it (one ASGI middleware): the Host header, the API key, the
body size and finite JSON numbers.

- Host: a page on another site whose DNS name is re-pointed at 127.0.0.1 ("DNS rebinding") reaches a local
  server with its own name in the Host header; answering only to the bound address, localhost names and
  `--allowed-host` names stops it.
- API key: `Authorization: Bearer KEY`, or HTTP Basic with KEY as the password (any user name: what
  A1111's `--api-auth` clients and browsers send); a 401 asks browsers for it.
- Body size: 413 beyond the limit, told by Content-Length or, for a body streamed without one, as soon as
  the bytes received pass it. Image uploads get a larger limit than the rest.
- NaN, Infinity and numbers beyond a float's range are not JSON, though Python's parser reads them: a 422,
  wherever in the body they are (so are integers too long for any field).
"""

import base64
import binascii
import hmac
import json
import math

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
MAX_INT_DIGITS = 40                 # no field takes more (seeds have 10); Python refuses > 4300 itself
CHALLENGE = b'Basic realm="nanodiffusion"'


class _NotFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NotFinite(name)


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotFinite(f"a {len(text)}-digit integer")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def host_name(header: str) -> str:
    """The name in a Host header without its port: "[::1]:7860" -> "::1", "Example.org:80" -> "example.org"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _json_response(status: int, detail, headers: tuple = ()) -> tuple[dict, bytes]:
    message = {"message": detail[0]["msg"]} if isinstance(detail, list) else {}
    body = json.dumps({"detail": detail, **message}, ensure_ascii=True).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    return start, body


class Guard:
    """ASGI middleware: Host check (`allowed_hosts`, None: any), API key (`api_key`, None: none), body limit
    (`max_bytes`, `max_upload_bytes` for the `upload_paths`) and finite JSON numbers."""

    def __init__(self, app, *, max_bytes: int, max_upload_bytes: int, upload_paths: frozenset[str],
                 allowed_hosts: frozenset[str] | None = None, api_key: str | None = None):
        self.app, self.max_bytes, self.max_upload_bytes = app, max_bytes, max_upload_bytes
        self.upload_paths, self.allowed_hosts, self.api_key = upload_paths, allowed_hosts, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refuse_host(headers) or self._refuse_key(headers)
        if refusal:
            return await self._answer(send, *refusal)
        limit = self.max_upload_bytes if scope["path"] in self.upload_paths else self.max_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._answer(send, 413, f"the request body is larger than {limit} bytes",
                                      ((b"connection", b"close"),))
        messages, body = [], bytearray()
        while True:                                     # read the body up to the limit, then replay it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > limit:
                return await self._answer(send, 413, f"the request body is larger than {limit} bytes",
                                          ((b"connection", b"close"),))
            if not message.get("more_body", False):
                break
        if body and b"json" in headers.get(b"content-type", b""):
            refusal = _refuse_non_finite(bytes(body))
            if refusal:
                return await self._answer(send, 422, refusal)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _refuse_host(self, headers: dict) -> tuple | None:
        if self.allowed_hosts is None or ANY_HOST in self.allowed_hosts:
            return None
        name = host_name(headers.get(b"host", b"").decode("latin-1"))
        if name in self.allowed_hosts:
            return None
        allowed = ", ".join(sorted(self.allowed_hosts))
        return 400, (f"the Host header names {name!r}, which this server does not answer to (it answers to "
                     f"{allowed}; `nanodiffusion serve --allowed-host NAME` adds a name)")

    def _refuse_key(self, headers: dict) -> tuple | None:
        if self.api_key is None:
            return None
        scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        given = credentials.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, ValueError):
                given = ""
        elif scheme.lower() != "bearer":
            given = ""
        if given and hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return 401, ("this server needs its API key: send `Authorization: Bearer KEY`, or HTTP Basic "
                     "authentication with the key as the password"), ((b"www-authenticate", CHALLENGE),)

    async def _answer(self, send, status: int, detail, headers: tuple = ()) -> None:
        start, body = _json_response(status, detail, headers)
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _refuse_non_finite(body: bytes) -> list | None:
    """FastAPI's 422 detail when the JSON body holds NaN, Infinity or a number beyond a float's range;
    None otherwise (a body that is not JSON at all is left to FastAPI's own 422)."""
    try:
        json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except _NotFinite as error:
        message = (f"the body holds {str(error)[:40]}: JSON numbers must be finite (NaN, Infinity, numbers "
                   f"beyond a float's range and integers of more than {MAX_INT_DIGITS} digits are refused)")
        return [{"loc": ["body"], "msg": message, "type": "value_error"}]
    except (ValueError, RecursionError):
        pass
    return None
