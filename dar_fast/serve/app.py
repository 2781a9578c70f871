"""The HTTP app of `dar-fast serve` (FastAPI under uvicorn).

    GET  /                    the page (plain HTML/JS from this package, no external assets)
    GET  /health              model shape and load
    POST /v1/generate         labels -> base64 PNGs + tokens + the settings used
    POST /v1/generate/stream  the same, as server-sent events: `preview` per group, then `done`
    POST /v1/encode           a base64 image -> its tokens (for prefix_tokens / layout control)

The event loop never runs the model: requests become `Job`s for the batcher's worker
thread, whose events come back through `loop.call_soon_threadsafe`; PNG encoding runs in
a thread too.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dar_fast.serve.batcher import Batcher, Job, QueueFull
from dar_fast.serve.schema import BadRequest, check_encode, check_generate, png_base64

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY = 16 << 20               # bytes: a request body larger than this is refused (413)
DIGIT_NAMES = [str(i) for i in range(10)]


def _err(status: int, msg: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status, headers=headers)


async def _json_body(request: Request):
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"body larger than {MAX_BODY >> 20} MiB", 413)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def create_app(pipe, max_batch: int = 64, max_queue: int = 256, defaults: dict | None = None,
               class_names=None) -> FastAPI:
    """The app around a loaded Pipeline; the batcher's worker starts with the app (lifespan) and owns `pipe`."""
    tok = pipe.tok
    C, N = pipe.num_classes, tok.num_tokens
    defaults = dict(defaults if defaults is not None else (getattr(pipe, "defaults", None) or {}))
    names = class_names or (DIGIT_NAMES if C == 10 else [f"class {i}" for i in range(C)])
    batcher = Batcher(pipe, max_batch=max_batch, max_queue=max_queue)
    latency = {"ema": None}           # seconds per request, for Retry-After

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="dar-fast serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(BadRequest)
    async def _bad(request, e: BadRequest):
        return _err(e.status, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e):
        return _err(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _err(500, f"internal error: {type(e).__name__}: {e}")

    def health():
        return {"status": "ok", "num_classes": C, "image_size": list(tok.image_size), "num_groups": tok.num_groups,
                "num_tokens": N, **batcher.stats()}

    @app.get("/health")
    async def _health():
        return health()

    with open(os.path.join(HERE, "index.html"), encoding="utf-8") as f:
        page_cfg = {"num_classes": C, "class_names": names, "image_size": list(tok.image_size),
                    "num_groups": tok.num_groups, "num_tokens": N, "defaults": defaults}
        # the page reads its model from this literal; "</" is escaped so a class name cannot end the script
        html = f.read().replace("/*CONFIG*/null", json.dumps(page_cfg).replace("</", "<\\/"))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return html

    def make_job(req: dict, previews: bool, loop, q: asyncio.Queue) -> Job:
        labels = torch.tensor(req["labels"], dtype=torch.int64)
        B = labels.numel()
        cfg = req["cfg"]
        if isinstance(cfg, list):
            scales = torch.linspace(cfg[0], cfg[1], N, dtype=torch.float32)
        else:
            scales = None if cfg == 1.0 else torch.full((N,), cfg, dtype=torch.float32)

        def emit(kind, payload):
            try:
                loop.call_soon_threadsafe(q.put_nowait, (kind, payload))
            except RuntimeError:          # the loop is closed (server shutting down): nobody is listening
                job.cancel()

        job = Job(labels=labels, seeds=torch.full((B,), req["seed"], dtype=torch.int64),
                  ids=torch.tensor(req["sample_ids"], dtype=torch.int64), scales=scales,
                  temperature=req["temperature"], top_k=req["top_k"], top_p=req["top_p"], prefix=req["prefix"],
                  previews=previews, emit=emit, steps=req["steps"], solver=req["solver"])
        return job

    def settings(req: dict) -> dict:
        return {"cfg": req["cfg"], "seed": req["seed"], "sample_ids": req["sample_ids"],
                "temperature": req["temperature"], "top_k": req["top_k"], "top_p": req["top_p"],
                "steps": req["steps"] if req["steps"] is not None else len(tok.schedule()[1]), "solver": req["solver"],
                "prefix_length": 0 if req["prefix"] is None else int(req["prefix"].shape[1]),
                "sources": req["sources"]}

    async def start(request: Request, previews: bool):
        body = await _json_body(request)
        req = check_generate(body, num_classes=C, num_tokens=N, codebook_size=tok.codebook_size,
                             max_labels=min(max_batch, max_queue), defaults=defaults)
        q: asyncio.Queue = asyncio.Queue()
        job = make_job(req, previews, asyncio.get_running_loop(), q)
        try:
            batcher.submit(job)
        except QueueFull as e:
            per = latency["ema"] or 1.0
            wait = max(1, math.ceil(per * (batcher.queued_rows / max_batch + 1)))
            return None, None, None, _err(503, str(e), headers={"Retry-After": str(wait)})
        return req, job, q, None

    def finished(t0):
        dt = time.perf_counter() - t0
        latency["ema"] = dt if latency["ema"] is None else 0.8 * latency["ema"] + 0.2 * dt

    @app.post("/v1/generate")
    async def generate(request: Request):
        t0 = time.perf_counter()
        req, job, q, refusal = await start(request, previews=False)
        if refusal is not None:
            return refusal
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return _err(499, "client disconnected")
                    continue
                if kind == "error":
                    return _err(500, payload["error"])
                if kind == "done":
                    images = await asyncio.to_thread(png_base64, payload["images"])
                    finished(t0)
                    return {"images": images, "tokens": payload["tokens"].tolist(), "settings": settings(req)}
        finally:
            job.cancel()          # no-op once done; frees the rows of a client that left

    @app.post("/v1/generate/stream")
    async def generate_stream(request: Request):
        t0 = time.perf_counter()
        req, job, q, refusal = await start(request, previews=True)
        if refusal is not None:
            return refusal

        async def events():
            try:
                while True:
                    kind, payload = await q.get()
                    if kind == "preview":
                        images = await asyncio.to_thread(png_base64, payload["images"])
                        data = {"group": payload["group"], "step": payload["step"], "images": images}
                    elif kind == "done":
                        images = await asyncio.to_thread(png_base64, payload["images"])
                        data = {"images": images, "tokens": payload["tokens"].tolist(), "settings": settings(req)}
                        finished(t0)
                    else:
                        data = payload
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    if kind in ("done", "error"):
                        return
            finally:
                job.cancel()      # the client went away (or the stream ended): its rows leave the engine

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/encode")
    async def encode(request: Request):
        body = await _json_body(request)
        image = await asyncio.to_thread(check_encode, body, tok.image_size)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        batcher.call(lambda: pipe.encode(image), fut)      # the worker owns the model
        tokens = await asyncio.wrap_future(fut)
        return {"tokens": tokens[0].tolist(), "num_tokens": N, "image_size": list(tok.image_size)}

    return app
