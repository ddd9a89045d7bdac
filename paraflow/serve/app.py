"""An instance's HTTP API (FastAPI), OpenAI's images API where it has one:
`POST /v1/images/generations` (JSON), `POST /v1/images/edits` (multipart: an image, and a mask to
inpaint), either answered as JSON or server-sent events; `GET /v1/models` (the served model),
`/healthz` (liveness), `/readyz` (loaded and warmed up), `/metrics` (Prometheus),
`/v1/instance` (what it serves, how busy it is) and `/`, a page (page.html).

Every check runs here, before a job is queued: the API key (constant-time comparison), the body
size, JSON or the form and its files (uploads.py), the fields (requests.py), the instance's
limits and the run's own `validate`. A client that disconnects, or closes its event stream,
cancels its job at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from base64 import b64encode
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from paraflow.errors import ParaflowError
from paraflow.serve.engine import Engine
from paraflow.serve.jobs import Busy, Cancelled, Job, new_seed
from paraflow.serve.requests import EditRequest, RequestError, parse, parse_form
from paraflow.serve.uploads import FILES, checked_files, content_type, read_form, sized
from paraflow.validate import validate

RETRY_AFTER_S = 2


def _error(status: int, field: str, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": field}},
                        status_code=status, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError("body", f"the body is larger than {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"the body is larger than {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(job: Job, images: list[bytes]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": b64encode(png).decode(), "seed": job.seed + i}
                     for i, png in enumerate(images)]}


def _edit_field(message: str) -> str:
    """The form field a run's check names (`strength=...: ...`); an inpainting model is the
    mask's business (without one the edit is img2img)."""
    key = message.split("=", 1)[0]
    named = {"height": "size", "width": "size", "pipeline": "mask"}.get(key, key)
    return named if named in (*FILES, *EditRequest.model_fields) else "body"


def _settled(future: asyncio.Future[Any]) -> None:
    """Read the outcome of a job nobody waits for any more (else asyncio logs it)."""
    if not future.cancelled():
        future.exception()


def create_app(engine: Engine) -> FastAPI:
    serve = engine.cfg.serve
    api_key: str | None = serve.api_key
    max_body = int(serve.limits.max_body_bytes)
    max_upload = int(serve.limits.max_upload_bytes)
    metrics = engine.metrics
    app = FastAPI(title="paraflow", summary="text-to-image on one or many devices")
    app.state.engine = engine
    started = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is not None:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                raise RequestError("authorization", "a valid `Authorization: Bearer KEY` "
                                                    "header is required", 401)

    def checked(raw: bytes, request: Request) -> Job:
        authorize(request)
        kind = content_type(request)
        if kind != "application/json":
            raise RequestError("content-type", f"content-type {kind or 'missing'}: send "
                                               "application/json", 415)
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise RequestError("body", f"the body is not JSON: {err}") from None
        parsed = parse(body)
        width, height = engine.limits.check(parsed)
        job = Job(parsed, width, height, parsed.seed if parsed.seed is not None else new_seed())
        try:  # the checks a run makes (the strategy's band sizes among them)
            validate(engine.run_config(job), None, devices=False)
        except ParaflowError as err:
            raise RequestError("size", str(err)) from None
        return job

    async def edit(request: Request) -> Job:
        authorize(request)
        fields, files = await read_form(request, await _body(request, max_upload), max_upload)
        parsed = parse_form(fields, FILES)
        uploads, image_size = checked_files(files, engine.limits.max_side)
        parsed, width, height = sized(parsed, image_size, engine.limits)
        job = Job(parsed, width, height, parsed.seed if parsed.seed is not None else new_seed(),
                  uploads=uploads)
        with job.inputs() as inputs:  # the checks a run makes, on the files as a run has them
            try:
                validate(engine.run_config(job, inputs), None, devices=False)
            except ParaflowError as err:
                raise RequestError(_edit_field(str(err)), str(err)) from None
        return job

    def refused(err: RequestError) -> JSONResponse:
        metrics.errors.labels(kind=f"http_{err.status}").inc()
        return _error(err.status, err.field, err.message)

    @app.post("/v1/images/generations", response_model=None)
    async def generations(request: Request) -> Response:
        try:
            job = checked(await _body(request, max_body), request)
        except RequestError as err:
            return refused(err)
        return await _run(job, request)

    @app.post("/v1/images/edits", response_model=None)
    async def edits(request: Request) -> Response:
        try:
            job = await edit(request)
        except RequestError as err:
            return refused(err)
        return await _run(job, request)

    async def _run(job: Job, request: Request) -> Response:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if job.request.stream:
            def progress(event: dict[str, Any]) -> None:  # on the worker thread
                loop.call_soon_threadsafe(queue.put_nowait, event)

            job.on_progress = progress
        try:
            future = asyncio.wrap_future(engine.submit(job))
        except Busy as err:
            metrics.errors.labels(kind="busy").inc()
            return _error(429, "body", str(err), "rate_limit_error",
                          {"Retry-After": str(RETRY_AFTER_S)})
        if job.request.stream:
            return EventSourceResponse(_events(job, future, queue))
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            if not future.done() and await request.is_disconnected():
                job.cancelled.set()  # the worker stops at the next step
                future.add_done_callback(_settled)
                metrics.errors.labels(kind="cancelled").inc()
                return Response(status_code=499)
        return _finished(job, future)

    def _finished(job: Job, future: asyncio.Future[list[bytes]]) -> JSONResponse:
        try:
            images = future.result()
        except Cancelled as err:
            return _error(499, "body", str(err), "cancelled")
        except Exception as err:
            metrics.errors.labels(kind=type(err).__name__).inc()
            return _error(500, "body", f"generation failed: {err}", "server_error")
        metrics.latency.observe(time.perf_counter() - job.accepted)
        return JSONResponse(_answer(job, images))

    async def _events(job: Job, future: asyncio.Future[list[bytes]],
                      queue: asyncio.Queue[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
        try:
            while not future.done() or not queue.empty():
                getter: asyncio.Future[Any] = asyncio.ensure_future(queue.get())
                waiting: list[asyncio.Future[Any]] = [getter, future]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield {"event": "progress", "data": json.dumps(getter.result())}
                else:
                    getter.cancel()
            answer = _finished(job, future)
            kind = "result" if answer.status_code == 200 else "error"
            yield {"event": kind, "data": bytes(answer.body).decode()}
        finally:
            if not future.done():  # the client closed the stream
                job.cancelled.set()
                metrics.errors.labels(kind="cancelled").inc()
                future.add_done_callback(_settled)

    page = (Path(__file__).parent / "page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page  # a prompt form, live progress, the image, the instances

    def listed() -> dict[str, Any]:
        return {"id": engine.limits.model, "object": "model", "created": started,
                "owned_by": "paraflow"}

    @app.get("/v1/models", response_model=None)
    def models(request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as err:
            return refused(err)
        return JSONResponse({"object": "list", "data": [listed()]})

    @app.get("/v1/models/{model}", response_model=None)
    def model(model: str, request: Request) -> Response:
        try:
            authorize(request)
        except RequestError as err:
            return refused(err)
        if model != engine.limits.model:
            return _error(404, "model", f"model={model!r}: this service runs "
                                        f"{engine.limits.model!r}")
        return JSONResponse(listed())

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        alive = engine.worker.is_alive()
        return JSONResponse({"alive": alive}, status_code=200 if alive else 503)

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = engine.ready.is_set() and engine.worker.is_alive()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/instance")
    def instance() -> dict[str, Any]:
        return {"model": engine.limits.model, "ready": engine.ready.is_set(),
                "strategy": engine.strategy.mode, "ranks": engine.rank_pids,
                "queue_depth": engine.jobs.qsize() + len(engine.held),
                "in_flight": len(engine.running),
                "limits": {"multiple": engine.limits.multiple,
                           "max_side": engine.limits.max_side,
                           "max_images": engine.limits.max_images,
                           "max_steps": engine.limits.max_steps,
                           "schedulers": list(engine.limits.schedulers)},
                "lora": list(engine.limits.adapters)}
    return app
