"""The server's state between the routes and the worker: the settings, the models, the job queue, and what a
route does with a request (check it, queue it, wait for it while watching the client, answer its job).
"""

import asyncio
import base64
import json
import random
from dataclasses import dataclass, field, replace

from fastapi.responses import JSONResponse
from starlette.requests import Request

from nanodiffusion.diffusion.sampling_plan import img2img_sigmas
from nanodiffusion.errors import UserError
from nanodiffusion.server.controlnets import ControlInput, ControlNetRegistry, read_controls
from nanodiffusion.server.generation import PREVIEW_BUDGET, Previews, run_job
from nanodiffusion.server.jobs import FINISHED, Job, JobQueue, QueueFull
from nanodiffusion.server.limits import Limits
from nanodiffusion.server.models import ModelRegistry

MAX_BODY_BYTES = 1 << 20            # prompts are at most 10 000 characters: a real body is a few KB
MAX_UPLOAD_BYTES = 64 << 20         # img2img and png-info bodies carry base64 images


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so that text which is not valid Unicode (an unpaired
    surrogate, which JSON can carry as "\\ud83d") is still answered instead of failing to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ServerSettings:
    """How `nanodiffusion serve` runs (its flags): limits, queue, retention, access, previews."""

    limits: Limits = field(default_factory=Limits)
    queue_size: int = 8                         # jobs that may wait besides the running one; more get 429
    keep_jobs: int = 100                        # finished jobs kept for GET /api/jobs/{id} ...
    keep_minutes: float = 60.0                  # ... and for this long
    allowed_hosts: frozenset[str] | None = None  # Host header names answered (None: any; "*": any)
    api_key: str | None = None
    preview_budget: float = PREVIEW_BUDGET      # fraction of sampling time that previews may take
    max_body_bytes: int = MAX_BODY_BYTES
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    flags: dict = field(default_factory=dict)   # the command's flags, for GET /sdapi/v1/cmd-flags


@dataclass(frozen=True)
class ModelSwitch:
    """A queued job that loads another model (`POST /sdapi/v1/options`), in order with the generations."""

    name: str


class ModelLoading(Exception):
    """The model is being switched (answered 503 with Retry-After)."""


class Service:
    """What the routes share: settings, models, queue, and the server-wide CLIP skip (an A1111 option)."""

    def __init__(self, registry: ModelRegistry, settings: ServerSettings,
                 controlnets: ControlNetRegistry | None = None):
        self.registry, self.settings = registry, settings
        self.controlnets = controlnets or ControlNetRegistry()
        self.previews = Previews(settings.preview_budget)
        self.clip_skip = 1
        self.queue = JobQueue(self._run, max_waiting=settings.queue_size, keep_finished=settings.keep_jobs,
                              keep_seconds=settings.keep_minutes * 60)

    def _run(self, job: Job) -> None:
        if isinstance(job.request, ModelSwitch):
            self.registry.switch(job.request.name)
        else:
            # the answer names this model even when a switch queued behind the job has run by then
            job.model = self.registry.served
            run_job(self.registry.pipe, job.model, job, self.previews)

    def pipe(self):
        """The loaded pipeline; ModelLoading while a switch has unloaded it."""
        if self.registry.pipe is None:
            raise ModelLoading("a model is being loaded: retry in a few seconds")
        return self.registry.pipe

    def defaults(self) -> dict:
        """The settings a request leaves out: the model's generation defaults and the server's CLIP skip."""
        return {**getattr(self.pipe(), "generation_defaults", {}), "clip_skip": self.clip_skip}

    async def read_controls(self, body) -> list[ControlInput]:
        """The body's ControlNet units with their images and networks, read off the event loop."""
        units = body.controlnet_units
        if not units:
            return []
        return await asyncio.to_thread(read_controls, units, self.controlnets, self.pipe(),
                                       self.settings.limits.max_upload_pixels)

    def make_job(self, body, edits: list | None = None, controls: list[ControlInput] = ()) -> Job:
        """The job of an A1111 body (txt2img, or img2img with its prepared `edits`) and its ControlNet units
        (`read_controls`); a UserError when the pipeline's checks or the server's limits refuse it."""
        pipe = self.pipe()
        seed = body.seed if body.seed != -1 else random.randrange(2**32)
        request = body.generation_request(seed, self.defaults(), pipe.native_size)
        request = replace(request, controls=tuple(control.settings for control in controls))
        if hasattr(pipe, "prompt_loras"):               # <lora:NAME:W>: unknown names are refused here
            pipe.prompt_loras.check(request.prompts)
        sigmas = pipe.sigmas(request.sampler, request.num_steps, request.sigma_schedule)  # e.g. LCM's limits
        self.settings.limits.check(body, request, unet_parameters(pipe))
        steps = request.num_steps if edits is None or sigmas is None \
            else len(img2img_sigmas(sigmas, request.strength)) - 1
        return Job(request, body.num_images, steps, inputs=edits, controls=tuple(controls))

    async def wait(self, job: Job, request: Request) -> bool:
        """Wait, without blocking the event loop, until the worker finishes `job`; cancel it and return False
        when the client goes away first."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake() -> None:
            if not finished.done():
                finished.set_result(None)

        job.add_done_callback(lambda: loop.call_soon_threadsafe(wake))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.queue.cancel(job)
            raise
        finally:
            gone.cancel()
        if not finished.done():
            self.queue.cancel(job)
            return False
        return True

    def not_found(self, job_id: str, what: str = "") -> dict:
        """The 404 detail for a job id: "expired" when the job finished and was forgotten since."""
        if self.queue.expired(job_id):
            kept = self.settings
            return {"detail": f"job {job_id} expired: finished jobs are kept for {kept.keep_minutes:g} minutes, "
                              f"the last {kept.keep_jobs} of them"}
        return {"detail": f"no job {job_id}{what}"}

    def job_json(self, job: Job) -> dict:
        """Our job API's view of a job (GET /api/jobs/{id})."""
        images = [{"url": f"/api/jobs/{job.id}/images/{k}.png", "filename": image_filename(k, image.seed),
                   "seed": image.seed, "parameters": image.infotext, "width": _size(image)[0],
                   "height": _size(image)[1], "partial": image.partial}
                  for k, image in enumerate(list(job.images))]
        preview = job.preview
        request = job.request.to_dict() if hasattr(job.request, "to_dict") else {"model": job.request.name}
        return {"id": job.id, "state": job.state, "progress": job.progress, "image_index": job.image_index,
                "step": job.step, "num_steps": job.num_steps, "num_images": job.num_images,
                "queue_position": self.queue.position(job), "cancel_requested": job.cancel_requested,
                "interrupted": job.interrupted, "error": job.error, "images": images,
                "preview": None if preview is None or job.state in FINISHED else
                {"step": preview[0], "url": f"/api/jobs/{job.id}/preview.png?step={preview[0]}"},
                "request": request}

    def current_preview(self) -> str | None:
        """The running job's latest preview as base64 PNG (A1111's progress `current_image`)."""
        job = self.queue.current
        preview = job.preview if job is not None else None
        return base64.b64encode(preview[1]).decode("ascii") if preview else None


def image_filename(index: int, seed: int) -> str:
    """The download name of image `index` of a job: 00000-SEED.png, as `generate --out-dir` names files."""
    return f"{index:05d}-{seed}.png"


def _size(image) -> tuple[int, int]:
    """An image's pixel size, read from its PNG header (img2img's only-masked results keep the init size)."""
    return int.from_bytes(image.png[16:20], "big"), int.from_bytes(image.png[20:24], "big")


def unet_parameters(pipe) -> int:
    """The UNet's parameter count (the job cost's model size); 0 for a pipeline without one (test fakes)."""
    unet = getattr(pipe, "unet", None)
    return sum(p.numel() for p in unet.parameters()) if unet is not None else 0


async def _disconnected(request: Request) -> None:
    """Return when the client of `request` disconnects (its body has been read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def dumps(data: dict) -> str:
    """JSON text as A1111 embeds it in answers (its `info`)."""
    return json.dumps(data, ensure_ascii=False)


def user_error(error: UserError, loc: tuple = ("body",)) -> dict:
    """FastAPI's 422 body for a refusal of our own: `detail` as a list, `message` as one line."""
    return {"detail": [{"loc": list(loc), "msg": str(error), "type": "value_error"}], "message": str(error)}


def queue_or_429(service: Service, job) -> AsciiJSONResponse | None:
    """Queue `job`: None, or the 429 answer when the queue is full."""
    try:
        service.queue.submit(job)
    except QueueFull as error:
        return AsciiJSONResponse({"detail": str(error)}, status_code=429,
                                 headers={"Retry-After": str(error.retry_after)})
    return None
