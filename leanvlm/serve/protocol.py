"""The OpenAI chat-completions request, checked field by field, and its images (data: URLs, or http(s) URLs
when allowed) fetched within size and time limits. Everything here raises ApiError with the HTTP status and
OpenAI error code a client should see."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from leanvlm.errors import TooLargeError, UserError

_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[A-Za-z0-9=.+-]+)*;base64,", re.ASCII)
ROLES = ("system", "user", "assistant")
MAX_STOP = 4


class ApiError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_user_error(cls, e: UserError, param: str | None = None) -> "ApiError":
        if isinstance(e, TooLargeError):
            return cls(413, str(e), param, "image_too_large")
        code = "context_length_exceeded" if "exceeds this engine's limit" in str(e) else None
        return cls(400, str(e), param, code)


@dataclass(frozen=True)
class Limits:
    """What a client may send."""

    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    allow_image_urls: bool = False
    url_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    """A parsed request: the conversation in the chat template's form, its one image source, sampling."""

    messages: list[dict]
    image_url: str
    sampling: dict
    stream: bool
    include_usage: bool
    model: str | None


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _number(body: dict, name: str, lo: float, hi: float, default):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _bad(f"{name}={value!r}: must be a number in [{lo}, {hi}]", name)
    return value


def parse_chat_request(body) -> ChatRequest:
    """Check an OpenAI chat-completions body; exactly one image across the messages (the engine's inputs)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages: must be a non-empty list", "messages")
    messages, images = [], []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise _bad(f"{where}: must be an object with role one of {', '.join(ROLES)}", where)
        content = msg.get("content")
        parts: list[dict] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url:
                        raise _bad(f"{pwhere}: image_url needs a url", pwhere)
                    if msg["role"] != "user":
                        raise _bad(f"{pwhere}: images go in user messages", pwhere)
                    images.append(url)
                    parts.append({"type": "image"})
                else:
                    raise _bad(f"{pwhere}: content parts are text or image_url", pwhere)
        else:
            raise _bad(f"{where}.content: must be a string or a list of content parts", f"{where}.content")
        messages.append({"role": msg["role"], "content": parts})
    if len(images) != 1:
        raise _bad(f"this model takes exactly one image per request; got {len(images)} (send one image_url part)",
                   "messages", "invalid_image_count")
    if messages[-1]["role"] != "user":
        raise _bad("the last message must be the user's", "messages")

    n = body.get("n", 1)
    if n != 1:
        raise _bad(f"n={n!r}: only one choice per request is supported", "n")
    for name in ("logprobs", "tools", "functions", "response_format"):
        if body.get(name) not in (None, False):
            raise _bad(f"{name}: not supported by this server", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad(f"max_tokens={max_tokens!r}: must be a positive integer", "max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"stop: a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _bad(f"seed={seed!r}: must be a non-negative integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream: must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options: must be an object", "stream_options")
    sampling = {"max_new_tokens": max_tokens, "temperature": float(_number(body, "temperature", 0, 2, 1.0)),
                "top_p": float(_number(body, "top_p", 0, 1, 1.0)) or 1e-9, "seed": seed, "stop": tuple(stop)}
    model = body.get("model")
    return ChatRequest(messages, images[0], sampling, stream, bool(options.get("include_usage")),
                       model if isinstance(model, str) else None)


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URL, refusing more than `max_bytes` before decoding."""
    m = _DATA_URL.match(url)
    if not m:
        raise _bad("image_url: a data: URL must look like data:image/png;base64,<data>", "image_url",
                   "invalid_image_url")
    payload = url[m.end():]
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise ApiError(413, f"image_url: the image is over the {max_bytes}-byte limit", "image_url", "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"image_url: broken base64 data ({e})", "image_url", "invalid_image_url") from e
    if not data:
        raise _bad("image_url: empty image data", "image_url", "invalid_image_url")
    return data


async def fetch_image(url: str, limits: Limits) -> bytes:
    """A data: URL's bytes, or an http(s) URL fetched (when allowed) with a time limit and a byte limit."""
    if url.startswith("data:"):
        return decode_data_url(url, limits.max_image_bytes)
    if not url.startswith(("http://", "https://")):
        raise _bad("image_url: use a data: URL (or http(s) when the server allows image URLs)", "image_url",
                   "invalid_image_url")
    if not limits.allow_image_urls:
        raise _bad("image_url: this server takes images as data: URLs only (start it with --allow-image-urls to "
                   "fetch http(s) URLs)", "image_url", "invalid_image_url")
    import httpx

    chunks, size = [], 0
    try:
        async with httpx.AsyncClient(timeout=limits.url_timeout_s, follow_redirects=True,
                                     limits=httpx.Limits(max_connections=4)) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise _bad(f"image_url: fetching it returned HTTP {resp.status_code}", "image_url",
                               "invalid_image_url")
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_image_bytes:
                        raise ApiError(413, f"image_url: the image is over the {limits.max_image_bytes}-byte limit",
                                       "image_url", "image_too_large")
                    chunks.append(chunk)
    except httpx.HTTPError as e:
        raise _bad(f"image_url: could not fetch it ({type(e).__name__})", "image_url", "invalid_image_url") from e
    return b"".join(chunks)
