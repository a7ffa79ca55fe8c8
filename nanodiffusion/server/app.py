"""The web server: AUTOMATIC1111's API (`/sdapi/v1/...`), our small job API (`/api/jobs`) and the web page.

`create_app(pipe, model)` builds the FastAPI app around a TextToImage pipeline; `nanodiffusion serve` runs it
with uvicorn. Generations run one at a time on the job queue's worker thread (`jobs.py`), never in the event
loop, so progress, cancel and the page answer while an image is being made. OpenAPI: `/openapi.json`, `/docs`.
"""

import asyncio
import base64
import functools
import json
import random
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from nanodiffusion import __version__
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.server import a1111
from nanodiffusion.server.a1111 import Txt2ImgRequest
from nanodiffusion.server.generation import run_job
from nanodiffusion.server.jobs import FAILED, Job, JobQueue, QueueFull

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 1 << 20            # prompts are at most 10 000 characters: a real body is a few KB


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so that text which is not valid Unicode (an unpaired
    surrogate, which JSON can carry as "\\ud83d") is still answered instead of failing to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def create_app(pipe, model: ModelRecord, *, queue_size: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app serving `pipe` (a TextToImage, or anything with its `generate(request, callback=)`, `sigmas`
    and `native_size`); at most `queue_size` jobs wait besides the running one, more get 429."""
    queue = JobQueue(functools.partial(run_job, pipe, model), max_waiting=queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        yield
        await asyncio.to_thread(queue.stop)

    app = FastAPI(title="nanodiffusion", version=__version__, lifespan=lifespan,
                  default_response_class=AsciiJSONResponse,
                  description="Text-to-image with Stable Diffusion v1.x: AUTOMATIC1111's API and a job API.")
    app.state.queue = queue
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC / "index.html"))
    _add_a1111_routes(app, queue, pipe, model)
    _add_job_routes(app, queue, pipe, model)
    return app


def _add_a1111_routes(app: FastAPI, queue: JobQueue, pipe, model: ModelRecord) -> None:
    @app.post("/sdapi/v1/txt2img", tags=["a1111"])
    async def txt2img(body: Txt2ImgRequest):
        """Generate batch_size × n_iter images and wait for them; image k has seed + k."""
        job = _submit(queue, pipe, body)
        if isinstance(job, Response):
            return job
        try:
            await _finished(job)
        except asyncio.CancelledError:
            queue.cancel(job)
            raise
        if job.state == FAILED:
            return AsciiJSONResponse({"error": "generation failed", "detail": job.error}, status_code=500)
        info = a1111.txt2img_info(body, job.images, model, interrupted=job.cancel_requested)
        return {"images": [base64.b64encode(image.png).decode("ascii") for image in job.images],
                "parameters": body.model_dump(), "info": _json(info)}

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    async def progress(skip_current_image: bool = False):     # A1111's parameter; we send no previews
        return a1111.progress(queue.current, queue.num_waiting)

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt():
        """Stop the running job at its next step (its txt2img call answers with the images finished)."""
        if queue.current is not None:
            queue.cancel(queue.current)
        return {}

    app.get("/sdapi/v1/samplers", tags=["a1111"])(a1111.samplers)
    app.get("/sdapi/v1/schedulers", tags=["a1111"])(a1111.schedulers)
    app.get("/sdapi/v1/sd-models", tags=["a1111"])(lambda: a1111.sd_models(model))
    app.get("/sdapi/v1/options", tags=["a1111"])(
        lambda: {"sd_model_checkpoint": a1111.sd_models(model)[0]["title"], "CLIP_stop_at_last_layers": 1,
                 "samples_format": "png"})


def _add_job_routes(app: FastAPI, queue: JobQueue, pipe, model: ModelRecord) -> None:
    @app.get("/api/info", tags=["jobs"])
    async def info():
        """The model, its native size, and the limits the page needs."""
        return {"model": model.name, "model_hash": model.hash, "dtype": model.dtype, "device": model.device,
                "native_size": pipe.native_size, "max_size": a1111.MAX_SIZE, "max_steps": a1111.MAX_STEPS,
                "max_images": a1111.MAX_IMAGES_PER_BATCH, "queue_size": queue.max_waiting,
                "version": __version__}

    @app.post("/api/jobs", status_code=202, tags=["jobs"])
    async def submit(body: Txt2ImgRequest):
        """Queue a generation (the txt2img body); poll GET /api/jobs/{id} for progress and images."""
        job = _submit(queue, pipe, body)
        return job if isinstance(job, Response) else _job_json(job, queue)

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def status(job_id: str):
        job = queue.get(job_id)
        return _job_json(job, queue) if job else _not_found(job_id)

    @app.delete("/api/jobs/{job_id}", tags=["jobs"])
    async def cancel(job_id: str):
        """Cancel: a waiting job at once, the running one at its next step."""
        job = queue.get(job_id)
        if job is None:
            return _not_found(job_id)
        queue.cancel(job)
        return _job_json(job, queue)

    @app.get("/api/jobs/{job_id}/images/{index}.png", tags=["jobs"], response_class=Response)
    async def image(job_id: str, index: int):
        job = queue.get(job_id)
        if job is None or not 0 <= index < len(job.images):
            return _not_found(f"{job_id}/images/{index}.png")
        name = f"{index:05d}-{job.images[index].seed}.png"
        return Response(job.images[index].png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{name}"'})


def _submit(queue: JobQueue, pipe, body: Txt2ImgRequest) -> Job | AsciiJSONResponse:
    """Queue the job of `body`; 422 when the pipeline's own checks refuse it, 429 when the queue is full."""
    seed = body.seed if body.seed != -1 else random.randrange(2**32)
    try:
        request = body.generation_request(seed)
        pipe.sigmas(request.sampler, request.num_steps, request.sigma_schedule)   # e.g. LCM's own limits
        job = Job(request, body.num_images)
    except UserError as error:
        detail = [{"loc": ["body"], "msg": str(error), "type": "value_error"}]
        return AsciiJSONResponse({"detail": detail, "message": str(error)}, status_code=422)
    try:
        return queue.submit(job)
    except QueueFull as error:
        return AsciiJSONResponse({"detail": str(error)}, status_code=429,
                                 headers={"Retry-After": str(error.retry_after)})


async def _finished(job: Job) -> None:
    """Wait, without blocking the event loop, until the worker thread finishes `job`."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()

    def wake() -> None:
        if not finished.done():
            finished.set_result(None)

    job.add_done_callback(lambda: loop.call_soon_threadsafe(wake))
    await finished


def _job_json(job: Job, queue: JobQueue) -> dict:
    images = [{"url": f"/api/jobs/{job.id}/images/{k}.png", "seed": image.seed, "parameters": image.infotext,
               "width": image.request.width, "height": image.request.height}
              for k, image in enumerate(list(job.images))]
    return {"id": job.id, "state": job.state, "progress": job.progress, "image_index": job.image_index,
            "step": job.step, "num_steps": job.request.num_steps, "num_images": job.num_images,
            "queue_position": queue.position(job), "cancel_requested": job.cancel_requested,
            "error": job.error, "images": images, "request": job.request.to_dict()}


def _not_found(what: str) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": f"no job {what} (finished jobs are kept for a while only)"},
                             status_code=404)


async def _validation_error(request: Request, error: RequestValidationError) -> AsciiJSONResponse:
    """FastAPI's 422 body (without echoing the input) plus `message`: every error as "field: reason"."""
    errors = [{key: value for key, value in e.items() if key != "input"} for e in error.errors()]
    reasons = []
    for e in errors:
        loc = e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"]
        field = ".".join(str(part) for part in loc)
        reason = e["msg"].removeprefix("Value error, ")
        reasons.append(f"{field}: {reason}" if field else reason)
    return AsciiJSONResponse({"detail": jsonable_encoder(errors), "message": "; ".join(reasons)},
                             status_code=422)


def _json(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, told by its Content-Length or, for a body
    streamed without one, as soon as the bytes received pass the limit; the app never sees such a body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        messages, size = [], 0
        while True:                                     # read the body up to the limit, then replay it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        body = _json({"detail": f"the request body is larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
