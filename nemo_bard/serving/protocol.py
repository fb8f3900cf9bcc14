"""The OpenAI chat-completions request: validation (one error naming the field) and media loading.

Torch-free apart from what the processor needs; every problem raises :class:`RequestError` with the HTTP status,
the offending field (OpenAI's ``param``) and a message that says how to fix it.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from nemo_bard.data.media import MediaError, load_image

ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
MAX_ASPECT_RATIO = 200  # Qwen3-VL's image processor refuses more
MAX_IMAGE_PIXELS = 64_000_000


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status, ``param`` the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body (media still as references)."""

    model: str | None
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    confidence_threshold: float | None = None
    return_token_ids: bool = False  # extension: the answer's token ids in the response (and in each chunk)


def _number(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{key} must be a finite number, got {value!r}", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"{key} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, lo: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {value!r}", key)
    if value < lo:
        raise RequestError(f"{key} must be >= {lo}, got {value}", key)
    return value


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raises :class:`RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {model!r}", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise RequestError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("text", "image_url", "video_url"):
                    raise RequestError(f"{where}.content[{j}].type must be text, image_url or video_url, got {kind!r}",
                                       f"{where}.content[{j}].type")
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise RequestError("n must be 1 (one choice per request)", "n")
    if body.get("logprobs"):
        raise RequestError("logprobs are not supported", "logprobs")
    if body.get("tools"):
        raise RequestError("tools are not supported", "tools")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
    top_k = _integer(body, "top_k", 0)
    return ChatRequest(
        model=model, messages=messages, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0) or 0.0, top_p=_number(body, "top_p", 0.0, 1.0, True),
        top_k=top_k or None, seed=seed, stop=stops, stream=stream, include_usage=bool(options.get("include_usage")),
        confidence_threshold=_number(body, "confidence_threshold", 0.0, 1.0),
        return_token_ids=bool(body.get("return_token_ids", False)),
    )


@dataclass
class MediaPolicy:
    """Where media may come from: data URLs always, local files only under ``allowed_dir``; size limits."""

    allowed_dir: Path | None = None
    max_bytes: int = 32 * 1024 * 1024


def media_bytes_or_path(url: Any, param: str, policy: MediaPolicy) -> dict:
    """``{"bytes": ...}`` of a data URL or ``{"path": ...}`` of an allowed local file."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{param} must be a data URL or a local path", param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(f"{param}: a data URL must be base64 (data:<mime>;base64,<data>)", param)
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise RequestError(f"{param}: the media is larger than the server's limit of {policy.max_bytes} bytes "
                               "(--max-media-bytes)", param, status=413)
        try:
            return {"bytes": base64.b64decode(payload, validate=True)}
        except (binascii.Error, ValueError):
            raise RequestError(f"{param}: the data URL's payload is not valid base64", param) from None
    if url.startswith(("http://", "https://")):
        raise RequestError(f"{param}: remote URLs are not fetched by this server; send the media as a data URL",
                           param)
    path = Path(url.removeprefix("file://"))
    if policy.allowed_dir is None:
        raise RequestError(f"{param}: local files are not allowed; send a data URL, or start the server with "
                           "--allowed-local-media-path DIR", param, status=403)
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RequestError(f"{param}: {path} does not exist", param) from None
    if not resolved.is_relative_to(policy.allowed_dir):
        raise RequestError(f"{param}: {path} is outside the allowed directory {policy.allowed_dir} "
                           "(--allowed-local-media-path)", param, status=403)
    if resolved.is_file() and resolved.stat().st_size > policy.max_bytes:
        raise RequestError(f"{param}: {path} is larger than the server's limit of {policy.max_bytes} bytes "
                           "(--max-media-bytes)", param, status=413)
    return {"path": os.fspath(resolved)}


def load_request_image(ref: dict, param: str) -> Any:
    """A PIL image, or :class:`RequestError` naming ``param`` when it is unreadable or out of bounds."""
    try:
        image = load_image(ref)
    except (MediaError, Image.DecompressionBombError) as exc:
        raise RequestError(f"{param}: {exc}", param) from None
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise RequestError(f"{param}: {w}x{h} pixels is more than the limit of {MAX_IMAGE_PIXELS}", param, status=413)
    if max(w, h) / max(min(w, h), 1) > MAX_ASPECT_RATIO:
        raise RequestError(f"{param}: aspect ratio {w}x{h} is beyond {MAX_ASPECT_RATIO}:1, which the model's "
                           "image processor cannot resize; crop or pad the image", param)
    return image


def conversation(request: ChatRequest, policy: MediaPolicy) -> list[dict]:
    """The request's messages as a chat for the processor: images loaded, videos as references."""
    chat = []
    for i, m in enumerate(request.messages):
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for j, part in (enumerate(content) if isinstance(content, list) else ()):
            param = f"messages[{i}].content[{j}]"
            kind = part["type"]
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(f"{param}.text must be a string", f"{param}.text")
                parts.append({"type": "text", "text": part["text"]})
                continue
            spec = part.get(kind)
            url = spec.get("url") if isinstance(spec, dict) else spec
            ref = media_bytes_or_path(url, f"{param}.{kind}.url", policy)
            if kind == "image_url":
                parts.append({"type": "image", "image": load_request_image(ref, f"{param}.image_url")})
            else:
                parts.append({"type": "video", "video": ref})
        chat.append({"role": m["role"], "content": parts})
    return chat
