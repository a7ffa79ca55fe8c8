"""The web server: AUTOMATIC1111's API (`/sdapi/v1/...`, `a1111_routes.py`), our small job API (`/api/jobs`)
and the web page.

`create_app(pipe, model, settings)` builds the FastAPI app around a TextToImage pipeline; `nanodiffusion
serve` runs it with uvicorn. Generations run one at a time on the job queue's worker thread (`jobs.py`),
never in the event loop, so progress, cancel and the page answer while an image is being made. API docs:
`/docs` (a page of our own, offline) and `/openapi.json`.
"""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from nanodiffusion import __version__
from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.server.a1111 import Img2ImgRequest, Txt2ImgRequest
from nanodiffusion.server.a1111_routes import (
    IMG2IMG_PATH, PNG_INFO_PATH, TXT2IMG_PATH, add_a1111_routes, prepare_edits,
)
from nanodiffusion.server.controlnets import ControlNetRegistry
from nanodiffusion.server.guards import Guard
from nanodiffusion.server.models import ModelRegistry
from nanodiffusion.server.service import (
    AsciiJSONResponse, ModelLoading, Service, ServerSettings, image_filename, queue_or_429, user_error,
)

STATIC = Path(__file__).resolve().parent / "static"
IMG2IMG_JOBS_PATH = "/api/jobs/img2img"
JOBS_PATH = "/api/jobs"


def create_app(pipe, model: ModelRecord, settings: ServerSettings = ServerSettings(), *,
               registry: ModelRegistry | None = None,
               controlnets: ControlNetRegistry | None = None) -> FastAPI:
    """The app serving `pipe` (a TextToImage, or anything with its `generate(request, callback=)`, `sigmas`,
    `native_size` and `generation_defaults`), or the models of `registry` when given; `controlnets`: the
    ControlNets that requests may use."""
    service = Service(registry or ModelRegistry(pipe, model), settings, controlnets)
    # txt2img bodies carry images when ControlNets are served
    uploads = (IMG2IMG_PATH, PNG_INFO_PATH, IMG2IMG_JOBS_PATH,
               *((TXT2IMG_PATH, JOBS_PATH) if controlnets and controlnets.dirs else ()))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.queue.start()
        yield
        await asyncio.to_thread(service.queue.stop)

    app = FastAPI(title="nanodiffusion", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, default_response_class=AsciiJSONResponse,
                  description="Text-to-image with Stable Diffusion v1.x: AUTOMATIC1111's API and a job API.")
    app.state.service = service
    app.add_middleware(Guard, max_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes,
                       upload_paths=frozenset(uploads),
                       allowed_hosts=settings.allowed_hosts, api_key=settings.api_key)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ModelLoading, _loading)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.get("/", include_in_schema=False)(lambda: FileResponse(STATIC / "index.html"))
    app.get("/docs", include_in_schema=False)(lambda: FileResponse(STATIC / "docs.html"))
    app.get("/favicon.ico", include_in_schema=False)(
        lambda: FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml"))
    add_a1111_routes(app, service)
    _add_job_routes(app, service)
    return app


def _add_job_routes(app: FastAPI, service: Service) -> None:
    queue = service.queue

    @app.get("/api/info", tags=["jobs"])
    async def info():
        """The model, its native size and defaults, and the limits the page needs."""
        pipe, model, limits = service.pipe(), service.registry.served, service.settings.limits
        request = Txt2ImgRequest().generation_request(0, service.defaults(), pipe.native_size)
        return {"model": model.name, "model_hash": model.hash, "dtype": model.dtype, "device": model.device,
                "native_size": pipe.native_size, "max_size": limits.max_size, "max_steps": limits.max_steps,
                "max_images": limits.max_batch_size, "max_job_cost": limits.max_job_cost,
                "queue_size": queue.max_waiting, "version": __version__,
                "defaults": {"steps": request.num_steps, "cfg_scale": request.guidance_scale,
                             "sampler": request.sampler, "schedule": request.sigma_schedule,
                             "denoising_strength": request.strength}}

    async def submit(body, edits=None):
        try:
            job = service.make_job(body, edits, await service.read_controls(body))
        except UserError as error:
            return AsciiJSONResponse(user_error(error), status_code=422)
        return queue_or_429(service, job) or AsciiJSONResponse(service.job_json(job), status_code=202)

    @app.post(JOBS_PATH, status_code=202, tags=["jobs"])
    async def submit_txt2img(body: Txt2ImgRequest):
        """Queue a generation (the txt2img body); poll GET /api/jobs/{id} for progress and images."""
        return await submit(body)

    @app.post(IMG2IMG_JOBS_PATH, status_code=202, tags=["jobs"])
    async def submit_img2img(body: Img2ImgRequest):
        """Queue an img2img or inpainting job (the img2img body)."""
        edits = await prepare_edits(service, body)
        return edits if isinstance(edits, Response) else await submit(body, edits)

    _add_job_result_routes(app, service)


def _add_job_result_routes(app: FastAPI, service: Service) -> None:
    queue = service.queue

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def status(job_id: str):
        job = queue.get(job_id)
        return service.job_json(job) if job else AsciiJSONResponse(service.not_found(job_id), 404)

    @app.delete("/api/jobs/{job_id}", tags=["jobs"])
    async def cancel(job_id: str):
        """Cancel: a waiting job at once, the running one within a layer of its networks."""
        job = queue.get(job_id)
        if job is None:
            return AsciiJSONResponse(service.not_found(job_id), 404)
        queue.cancel(job)
        return service.job_json(job)

    @app.get("/api/jobs/{job_id}/images/{index}.png", tags=["jobs"], response_class=Response)
    async def image(job_id: str, index: int):
        job = queue.get(job_id)
        if job is None or not 0 <= index < len(job.images):
            return AsciiJSONResponse(service.not_found(job_id, f" or no image {index} in it"), 404)
        name = image_filename(index, job.images[index].seed)
        return Response(job.images[index].png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{name}"'})

    @app.get("/api/jobs/{job_id}/preview.png", tags=["jobs"], response_class=Response)
    async def preview(job_id: str):
        """The latest preview of the running job: its denoised estimate, decoded."""
        job = queue.get(job_id)
        preview = job.preview if job else None
        if preview is None:
            return AsciiJSONResponse(service.not_found(job_id, " with a preview now"), 404)
        return Response(preview[1], media_type="image/png", headers={"Cache-Control": "no-store"})


async def _validation_error(request: Request, error: RequestValidationError) -> AsciiJSONResponse:
    """FastAPI's 422 body (without echoing the input) plus `message`: every error as "field: reason"."""
    errors = [{key: value for key, value in e.items() if key not in ("input", "ctx", "url")}
              for e in error.errors()]
    reasons = []
    for e in errors:
        loc = e["loc"][1:] if e["loc"][:1] == ("body",) else e["loc"]
        field = ".".join(str(part) for part in loc)
        reason = e["msg"].removeprefix("Value error, ")
        reasons.append(f"{field}: {reason}" if field else reason)
    return AsciiJSONResponse({"detail": jsonable_encoder(errors), "message": "; ".join(reasons)},
                             status_code=422)


async def _loading(request: Request, error: ModelLoading) -> AsciiJSONResponse:
    return AsciiJSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "5"})
