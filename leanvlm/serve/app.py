"""The OpenAI-compatible HTTP app over a continuous-batching Scheduler.

POST /v1/chat/completions (JSON or server-sent events), GET /v1/models, GET /health, GET /metrics. A request
is parsed, its image fetched and decoded and its prompt tokenised before it queues, so a bad request is
answered alone (an OpenAI error object with its status) and never reaches the running batch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from leanvlm.errors import UserError
from leanvlm.runtime.scheduler import Event, QueueFullError, Scheduler, SchedulerClosedError
from leanvlm.serve.metrics import Metrics
from leanvlm.serve.protocol import ApiError, ChatRequest, Limits, fetch_image, parse_chat_request

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


@dataclass
class ServeOptions:
    """How a server runs: decode slots (None: the engine's max batch), requests allowed to wait for a slot,
    an API key (None: open), the model name clients use (None: the engine directory's name), client limits."""

    max_batch: int | None = None
    max_queue: int = 64
    api_key: str | None = None
    model_name: str | None = None
    limits: Limits = field(default_factory=Limits)


def create_app(pipeline, options: ServeOptions | None = None) -> FastAPI:
    """An app serving `pipeline`; its scheduler thread starts now and stops with the app's lifespan."""
    options = options or ServeOptions()
    name = options.model_name or (Path(pipeline.spec.directory).name if pipeline.spec.directory else "leanvlm")
    metrics = Metrics(options.max_batch or pipeline.spec.limits.max_batch)
    scheduler = Scheduler(pipeline, options.max_batch, options.max_queue, on_step=metrics.on_step)
    metrics.bind(scheduler)
    limits = options.limits
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        scheduler.close()

    app = FastAPI(title="leanvlm", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.pipeline = scheduler, metrics, pipeline

    def error(e: ApiError) -> JSONResponse:
        metrics.requests.labels(str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)", None, "invalid_api_key")

    def prepare(image: bytes, req: ChatRequest):
        try:
            prompt = pipeline.processor.apply_chat_template(req.messages, add_generation_prompt=True)
            return pipeline.preprocess.prepare(image, prompt), pipeline.params(**req.sampling)
        except UserError as e:
            raise ApiError.from_user_error(e) from e

    def usage(event: Event) -> dict:
        kept = len(event.kept[-1]) if event.kept else pipeline.spec.model.num_image_tokens
        return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "total_tokens": event.prompt_tokens + event.completion_tokens,
                "prompt_tokens_details": {"image_tokens": pipeline.spec.model.num_patch_tokens,
                                          "image_tokens_kept": kept}}

    def event_error(e: Exception) -> ApiError:
        if isinstance(e, SchedulerClosedError):
            return ApiError(503, str(e), None, "server_unavailable")
        if isinstance(e, UserError):
            return ApiError.from_user_error(e)
        return ApiError(500, f"internal error: {type(e).__name__}", None, "internal_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            req = parse_chat_request(await _read_json(request, limits.max_body_bytes))
            if req.model is not None and req.model != name:
                raise ApiError(404, f"model {req.model!r} is not served here; this server serves {name!r}", "model",
                               "model_not_found")
            try:
                image = await asyncio.wait_for(fetch_image(req.image_url, limits), limits.url_timeout_s)
            except asyncio.TimeoutError as e:
                raise ApiError(400, f"image_url: not fetched within {limits.url_timeout_s:g} s", "image_url",
                               "invalid_image_url") from e
            prepared, params = await run_in_threadpool(prepare, image, req)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Event] = asyncio.Queue()
            try:
                ticket = scheduler.submit(prepared, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            except QueueFullError as e:
                raise ApiError(429, str(e), None, "queue_full") from e
            except SchedulerClosedError as e:
                raise ApiError(503, str(e), None, "server_unavailable") from e
        except ApiError as e:
            return error(e)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            metrics.requests.labels("200").inc()
            return StreamingResponse(_stream(rid, now, name, req.include_usage, events, ticket, usage, event_error,
                                             metrics), media_type="text/event-stream")
        text, final = [], None
        try:
            while final is None:
                try:
                    event = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():  # the client left: free its slot
                        ticket.cancel()
                        return Response(status_code=499)
                    continue
                text.append(event.text)
                if event.final:
                    final = event
        finally:
            if final is None:
                ticket.cancel()
        if final.error is not None:
            return error(event_error(final.error))
        metrics.requests.labels("200").inc()
        metrics.finished(final)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": FINISH.get(final.finish_reason, "stop"), "logprobs": None}],
            "usage": usage(final)})

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "leanvlm"}]}

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        body = {"status": "ok" if ok else "unavailable", "pid": os.getpid(), "running": scheduler.running,
                "waiting": scheduler.queue_depth, "max_batch": scheduler.max_batch}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _read_json(request: Request, limit: int):
    """The body as JSON, refusing more than `limit` bytes (by Content-Length, or while reading)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the {limit}-byte limit", None, "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit", None, "body_too_large")
    try:
        return json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from e


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(rid, created, name, include_usage, events, ticket, usage, event_error, metrics):
    """OpenAI chunks: the role, content deltas, the finish reason, usage when asked, then [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    done = False
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event.error is not None:
                yield _sse(event_error(event.error).body())
                break
            if event.text:
                yield chunk({"content": event.text})
            if event.final:
                metrics.finished(event)
                yield chunk({}, FINISH.get(event.finish_reason, "stop"))
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                "choices": [], "usage": usage(event)})
                break
        yield _sse("[DONE]")
        done = True
    finally:
        if not done:  # the client went away mid-stream: free the slot at the next step
            ticket.cancel()
