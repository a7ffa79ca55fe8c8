"""The routes of AUTOMATIC1111's API (`/sdapi/v1/...`): txt2img, img2img, png-info, progress, interrupt,
skip, options (model switching), the model folder's rescan and the listings clients read at start-up."""

import asyncio
import base64
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from nanodiffusion.errors import UserError
from nanodiffusion.server import a1111_answers as answers
from nanodiffusion.server.a1111 import CLIP_SKIP_SETTING, Img2ImgRequest, Txt2ImgRequest
from nanodiffusion.server.a1111_images import decode_image, prepare, read_mask
from nanodiffusion.server.controlnets import MODULES as CONTROL_MODULES
from nanodiffusion.server.jobs import DONE, FAILED, INTERRUPT, SKIP, Job
from nanodiffusion.server.service import (
    AsciiJSONResponse, ModelSwitch, Service, dumps, queue_or_429, user_error,
)

IMG2IMG_PATH = "/sdapi/v1/img2img"
PNG_INFO_PATH = "/sdapi/v1/png-info"
TXT2IMG_PATH = "/sdapi/v1/txt2img"
CONTROLNET_API_VERSION = 2              # the ControlNet extension's API version that clients check


class PngInfoRequest(BaseModel):
    """The body of `POST /sdapi/v1/png-info`."""

    model_config = ConfigDict(strict=True, extra="forbid")
    image: str


def add_a1111_routes(app: FastAPI, service: Service) -> None:
    _add_generation_routes(app, service)
    _add_model_routes(app, service)
    _add_controlnet_routes(app, service)


def _add_generation_routes(app: FastAPI, service: Service) -> None:
    queue = service.queue

    @app.post(TXT2IMG_PATH, tags=["a1111"])
    async def txt2img(body: Txt2ImgRequest, request: Request):
        """Generate batch_size × n_iter images and wait for them; image k has seed + k."""
        return await _generate(service, body, request)

    @app.post(IMG2IMG_PATH, tags=["a1111"])
    async def img2img(body: Img2ImgRequest, request: Request):
        """img2img, and inpainting with a mask; image k has seed + k."""
        edits = await prepare_edits(service, body)
        return edits if isinstance(edits, Response) else await _generate(service, body, request, edits)

    @app.post(PNG_INFO_PATH, tags=["a1111"])
    async def png_info(body: PngInfoRequest):
        """The generation parameters stored in an image: A1111's `info` text, read into `parameters`."""
        try:
            image = await asyncio.to_thread(decode_image, body.image, "image",
                                            service.settings.limits.max_upload_pixels)
        except UserError as error:
            return AsciiJSONResponse(user_error(error, ("body", "image")), status_code=422)
        return answers.png_info(image)

    @app.get("/sdapi/v1/progress", tags=["a1111"])
    async def progress(skip_current_image: bool = False):
        """The running job's progress, with its latest preview unless skip_current_image."""
        preview = None if skip_current_image else service.current_preview()
        return answers.progress(queue.current, queue.num_waiting, preview)

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    async def interrupt():
        """Stop the running job now: its call answers with the images made, the last as far as it got."""
        if _generating(queue.current):
            queue.cancel(queue.current, INTERRUPT)
        return {}

    @app.post("/sdapi/v1/skip", tags=["a1111"])
    async def skip():
        """End the current image of the running job as far as it got, and go on with the next."""
        if _generating(queue.current):
            queue.cancel(queue.current, SKIP)
        return {}


def _add_model_routes(app: FastAPI, service: Service) -> None:
    registry = service.registry

    @app.get("/sdapi/v1/options", tags=["a1111"])
    async def get_options():
        return answers.options(registry, service.clip_skip)

    @app.post("/sdapi/v1/options", tags=["a1111"])
    async def set_options(request: Request, body: dict[str, Any] = Body(...)):
        """Switch the model (`sd_model_checkpoint`, one of sd-models; waits for the jobs queued before) or
        set CLIP_stop_at_last_layers. Other options are accepted only unchanged."""
        return await _set_options(service, body, request)

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    async def refresh_checkpoints():
        """Scan the model folders again."""
        await asyncio.to_thread(registry.refresh)
        return {}

    app.get("/sdapi/v1/sd-models", tags=["a1111"])(lambda: answers.sd_models(registry))
    app.get("/sdapi/v1/samplers", tags=["a1111"])(answers.samplers)
    app.get("/sdapi/v1/schedulers", tags=["a1111"])(answers.schedulers)
    app.get("/sdapi/v1/memory", tags=["a1111"])(answers.memory)
    app.get("/sdapi/v1/cmd-flags", tags=["a1111"])(lambda: service.settings.flags)
    app.get("/sdapi/v1/loras", tags=["a1111"])(lambda: answers.loras(service.pipe()))
    app.post("/sdapi/v1/refresh-loras", tags=["a1111"])(lambda: {})      # the listing scans the folder
    app.get("/sdapi/v1/embeddings", tags=["a1111"])(lambda: answers.embeddings(service.pipe()))
    for name, listing in answers.EMPTY_LISTINGS.items():
        app.get(f"/sdapi/v1/{name}", tags=["a1111"])(lambda listing=listing: listing)


def _add_controlnet_routes(app: FastAPI, service: Service) -> None:
    """The listings of A1111's ControlNet extension (the units come in txt2img/img2img bodies)."""
    controlnets = service.controlnets

    @app.get("/controlnet/model_list", tags=["controlnet"])
    async def model_list(update: bool = True):
        """The ControlNets of the --controlnet-dir folders, by the extension's titles "name [hash]"."""
        if update:
            await asyncio.to_thread(controlnets.refresh)
        return {"model_list": [controlnets.title(entry) for entry in controlnets.entries.values()]}

    app.get("/controlnet/module_list", tags=["controlnet"])(lambda: {"module_list": list(CONTROL_MODULES)})
    app.get("/controlnet/version", tags=["controlnet"])(lambda: {"version": CONTROLNET_API_VERSION})


def _generating(job: Job | None) -> bool:
    """True for a running generation (interrupt and skip leave a model switch alone)."""
    return job is not None and not isinstance(job.request, ModelSwitch)


async def prepare_edits(service: Service, body: Img2ImgRequest) -> list | Response:
    """The img2img inputs (one per init image) read and prepared off the event loop; a 422 when an image
    cannot be read."""
    limits = service.settings.limits
    native = service.pipe().native_size
    size = body.width or native, body.height or native

    def work() -> list:
        mask = body.mask and read_mask(decode_image(body.mask, "mask", limits.max_upload_pixels),
                                       body.inpainting_mask_invert, body.mask_blur)
        images = [decode_image(data, f"init_images.{k}", limits.max_upload_pixels)
                  for k, data in enumerate(body.init_images)]
        return [prepare(image, mask or None, *size, resize_mode=body.resize_mode, fill=body.inpainting_fill,
                        full_res=body.inpaint_full_res, padding=body.inpaint_full_res_padding)
                for image in images]

    if max(size) > limits.max_size:
        return AsciiJSONResponse(user_error(UserError(f"{'width' if size[0] > size[1] else 'height'}: "
                                                      f"{max(size)} is more than this server's limit of "
                                                      f"{limits.max_size}")), status_code=422)
    try:
        return await asyncio.to_thread(work)
    except UserError as error:
        return AsciiJSONResponse(user_error(error), status_code=422)


async def _generate(service: Service, body: Txt2ImgRequest, request: Request, edits: list | None = None):
    """Queue the job of `body`, wait for it (cancelled if the client goes away) and answer as A1111."""
    try:
        job = service.make_job(body, edits, await service.read_controls(body))
    except UserError as error:
        return AsciiJSONResponse(user_error(error), status_code=422)
    refusal = queue_or_429(service, job)
    if refusal is not None:
        return refusal
    if not await service.wait(job, request):
        return AsciiJSONResponse({"detail": "the client went away: the job was cancelled"}, status_code=499)
    if job.state == FAILED:
        return AsciiJSONResponse({"error": "generation failed", "detail": job.error}, status_code=500)
    info = answers.generation_info(body, job.request, job.images, job.model or service.registry.served,
                                   interrupted=job.cancel_requested)
    return {"images": [base64.b64encode(image.png).decode("ascii") for image in job.images],
            "parameters": body.echo(job.request), "info": dumps(info)}


async def _set_options(service: Service, body: dict, request: Request):
    current = answers.options(service.registry, service.clip_skip)
    checkpoint = body.get("sd_model_checkpoint")
    changes = {key: value for key, value in body.items() if key != "sd_model_checkpoint"}
    clip_skip = changes.pop(CLIP_SKIP_SETTING, service.clip_skip)
    refused = sorted(key for key, value in changes.items() if current.get(key, object()) != value)
    problems = [f"{key}: cannot be set here (settable: sd_model_checkpoint, {CLIP_SKIP_SETTING})"
                for key in refused]
    if type(clip_skip) is not int or not 1 <= clip_skip <= 12:
        problems.append(f"{CLIP_SKIP_SETTING}: must be an integer in 1..12, got {clip_skip!r}")
    if checkpoint is not None and not isinstance(checkpoint, str):
        problems.append(f"sd_model_checkpoint: must be a model's title or name, got {checkpoint!r}")
    try:
        if isinstance(checkpoint, str):
            service.registry.find(checkpoint)
    except UserError as error:
        problems.append(str(error))
    if problems:
        return AsciiJSONResponse(user_error(UserError("; ".join(problems))), status_code=422)
    service.clip_skip = clip_skip
    if checkpoint is None:
        return None
    job = service.queue.submit(Job(ModelSwitch(checkpoint), 1, 1), force=True)
    if not await service.wait(job, request):
        return AsciiJSONResponse({"detail": "the client went away: the switch was cancelled"},
                                 status_code=499)
    if job.state != DONE or job.interrupted:
        why = job.error or "the switch was cancelled (the server is stopping)"
        return AsciiJSONResponse(user_error(UserError(f"sd_model_checkpoint: {why}")), status_code=422)
    return None
