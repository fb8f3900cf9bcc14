"""The OpenAI-compatible HTTP API (FastAPI) over the :class:`~nemo_bard.serving.scheduler.Scheduler`.

Routes: ``POST /v1/chat/completions`` (``stream: true`` sends each committed block as a server-sent event as
soon as it commits; with ``--stream-prefix``, a block's decided leading tokens after each forward), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Every refusal is an
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status and touches
no other request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nemo_bard.serving.protocol import ChatRequest, MediaPolicy, RequestError, conversation, parse_chat_request
from nemo_bard.serving.scheduler import Draining, QueueFull, Scheduler, Ticket

RETRY_AFTER_S = 1


class Metrics:
    """The server's Prometheus metrics (one registry per server)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("nemo_bard_queue_depth", "Requests waiting for a decoding row", registry=r)
        self.running_rows = Gauge("nemo_bard_running_rows", "Requests being decoded", registry=r)
        self.forwards = Counter("nemo_bard_forwards", "Batched decoding forwards", registry=r)
        self.output_tokens = Counter("nemo_bard_output_tokens", "Generated tokens", registry=r)
        self.output_tokens_per_second = Gauge("nemo_bard_output_tokens_per_second",
                                              "Generated tokens per second over the last 10 s", registry=r)
        self.time_to_first_token = Histogram(
            "nemo_bard_time_to_first_token_seconds", "Arrival to the first committed tokens", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.latency = Histogram("nemo_bard_request_latency_seconds", "Arrival to the last token", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens_per_forward = Histogram("nemo_bard_tokens_per_forward", "Tokens per forward of a request",
                                            registry=r, buckets=(1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32))
        self.requests = Counter("nemo_bard_requests", "Finished requests by HTTP status", ["status"], registry=r)


@dataclass
class ServerConfig:
    """What the HTTP layer needs to know about the model and the limits."""

    model_name: str
    capacity: int  # cache slots per row: prompt + response (+ one block when joining)
    block_size: int  # 1 for AR
    default_max_tokens: int
    media: MediaPolicy = field(default_factory=MediaPolicy)
    request_timeout: float | None = None
    decoder: str = "bard"


def error_response(status: int, message: str, param: str | None = None, kind: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class TextStream:
    """Incremental detokenisation with stop strings: text is released when it can no longer change or be cut
    (an unfinished UTF-8 sequence and a suffix that may begin a stop string are held back)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        """New text after ``tokens``; sets ``stopped`` when a stop string appeared (the text ends before it)."""
        if self.stopped:
            return ""
        self.ids += tokens
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(len(self.sent) - len(s), 0)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._release(text[: len(text) - hold])

    def flush(self) -> str:
        """The held-back text at the end of the answer."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text if len(text) > len(self.sent) else self.sent
        return delta


class ClientGone(Exception):
    """The client closed the connection."""


def create_app(scheduler: Scheduler, processor: Any, config: ServerConfig, metrics: Metrics,
               build_inputs: Any) -> FastAPI:
    """The FastAPI application. ``build_inputs(processor, chat) -> dict`` turns a chat into processor inputs."""
    # One thread of its own decodes media and runs the processor (which is not thread-safe), in arrival order.
    # A pool would spread these allocations over many threads and so over many malloc arenas, which grow the
    # server's resident memory request after request.
    prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nemo-bard-processor")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nemo-bard", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.config = config
    tokenizer = getattr(processor, "tokenizer", processor)

    def prepare(chat_request: ChatRequest) -> dict:
        return build_inputs(processor, conversation(chat_request, config.media))

    def finish(status: int) -> None:
        metrics.requests.labels(status=str(status)).inc()

    async def next_event(queue: asyncio.Queue, request: Request) -> tuple:
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None

    @app.get("/health")
    async def health() -> Response:
        if not scheduler.alive or scheduler.draining:
            return error_response(503, "the server is shutting down" if scheduler.draining else
                                  "the decoding loop has stopped")
        return JSONResponse({"status": "ok", "running": scheduler.session.running,
                             "waiting": len(scheduler.waiting)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "nemo-bard", "decoder": config.decoder}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            finish(400)
            return error_response(400, f"the request body is not valid JSON ({exc})")
        try:
            chat = parse_chat_request(body)
            if chat.model is not None and chat.model != config.model_name:
                raise RequestError(f"model {chat.model!r} is not served here; this server serves "
                                   f"{config.model_name!r} (GET /v1/models)", "model", 404, "not_found_error")
            inputs = await asyncio.get_running_loop().run_in_executor(prep, prepare, chat)
            max_tokens = check_length(chat, int(inputs["input_ids"].shape[1]))
        except RequestError as exc:
            finish(exc.status)
            return error_response(exc.status, str(exc), exc.param, exc.kind)
        except Exception as exc:  # noqa: BLE001 - e.g. a video the decoder cannot read, a processor refusal
            finish(400)
            return error_response(400, f"the messages could not be processed: {exc}", "messages")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ticket = Ticket(inputs=inputs, max_tokens=max_tokens, deliver=lambda ev: loop.call_soon_threadsafe(
            queue.put_nowait, ev), threshold=chat.confidence_threshold, temperature=chat.temperature,
            top_p=chat.top_p, top_k=chat.top_k, seed=chat.seed, timeout=app.state.config.request_timeout)
        try:
            scheduler.submit(ticket)
        except QueueFull as exc:
            finish(429)
            return error_response(429, f"the server is busy: {exc}; retry after {RETRY_AFTER_S} s",
                                  kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        except Draining as exc:
            finish(503)
            return error_response(503, str(exc))
        try:
            first = await next_event(queue, request)
        except ClientGone:  # gone while queued: drop the request, answer nobody
            ticket.cancel("disconnected")
            finish(499)
            return Response(status_code=499)
        except asyncio.CancelledError:
            ticket.cancel("disconnected")
            raise
        if first[0] == "error":
            finish(first[1])
            return error_response(first[1], first[2])
        prompt_tokens = first[1]
        stream = TextStream(tokenizer, chat.stop)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if chat.stream:
            return StreamingResponse(sse(ticket, queue, request, stream, rid, created, prompt_tokens, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces: list[str] = []
        try:
            while True:
                event = await next_event(queue, request)
                if event[0] == "tokens":
                    pieces.append(stream.add(event[1]))
                    if stream.stopped:
                        ticket.cancel("stop")
                elif event[0] == "error":
                    finish(event[1])
                    return error_response(event[1], event[2])
                elif event[0] == "done":
                    pieces.append(stream.flush())
                    finish(200)
                    return JSONResponse({
                        "id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                     "finish_reason": finish_reason(event, stream), "logprobs": None,
                                     **({"token_ids": stream.ids} if chat.return_token_ids else {})}],
                        "usage": usage(prompt_tokens, event[2], stream),
                    })
        except ClientGone:
            ticket.cancel("disconnected")
            finish(499)
            return Response(status_code=499)
        except asyncio.CancelledError:
            ticket.cancel("disconnected")
            finish(499)
            raise

    def check_length(chat: ChatRequest, prompt_tokens: int) -> int:
        """The request's max_tokens (default: what fits, up to the server's default); 400 when it cannot fit."""
        blen = config.block_size
        room = (config.capacity - prompt_tokens - (blen if blen > 1 else 0)) // blen * blen
        if room < 1:
            raise RequestError(f"the prompt has {prompt_tokens} tokens; this server's context is {config.capacity} "
                               "tokens (--max-model-len) including the answer; shorten the messages", "messages")
        if chat.max_tokens is None:
            return min(config.default_max_tokens, room)
        if chat.max_tokens > room:
            raise RequestError(f"max_tokens {chat.max_tokens} does not fit: the prompt has {prompt_tokens} tokens and "
                               f"this server's context is {config.capacity} tokens (--max-model-len); at most {room} "
                               "new tokens fit", "max_tokens")
        return chat.max_tokens

    def finish_reason(event: tuple, stream: TextStream) -> str:
        return "length" if event[1] == "length" and not stream.stopped else "stop"

    def usage(prompt_tokens: int, stats: dict | None, stream: TextStream) -> dict:
        done = len(stream.ids) if stats is None else stats["completion_tokens"]
        out = {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}
        if stats is not None:
            out.update({k: v for k, v in stats.items() if k != "completion_tokens"})
        return out

    async def sse(ticket: Ticket, queue: asyncio.Queue, request: Request, stream: TextStream, rid: str,
                  created: int, prompt_tokens: int, chat: ChatRequest) -> AsyncIterator[str]:
        def chunk(delta: dict, reason: str | None = None, **extra: Any) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        ended = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await next_event(queue, request)
                if event[0] == "tokens":
                    stopped_before = stream.stopped
                    text = stream.add(event[1])
                    if stream.stopped:
                        ticket.cancel("stop")
                    if chat.return_token_ids and not stopped_before:
                        yield chunk({"content": text, "token_ids": event[1]})
                    elif text:
                        yield chunk({"content": text})
                elif event[0] == "error":
                    ended = True
                    finish(event[1])
                    err = {"message": event[2], "type": "server_error", "param": None, "code": event[1]}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif event[0] == "done":
                    ended = True
                    tail = stream.flush()
                    if tail:
                        yield chunk({"content": tail})
                    yield chunk({}, finish_reason(event, stream))
                    if chat.include_usage:
                        body = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                "model": config.model_name, "choices": [],
                                "usage": usage(prompt_tokens, event[2], stream)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    finish(200)
                    return
        finally:
            if not ended:  # the client went away (or the server is stopping): free the row at the next block
                ticket.cancel("disconnected")
                finish(499)

    return app
