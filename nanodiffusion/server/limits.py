"""What one request to the server may ask for, and what a job costs (`nanodiffusion serve --max-...`).

Kept free of FastAPI and pydantic, so that the command's flags are built without them.
"""

from dataclasses import dataclass, fields

from nanodiffusion.errors import UserError

SD15_UNET_PARAMETERS = 859_520_964                  # the cost unit's model: SD v1.5's UNet


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (`nanodiffusion serve --max-...`). A job's cost is its images x
    (steps + 1, the decode) x megapixels / 0.262 (512x512) x (UNet parameters / SD v1.5's): the number of
    SD v1.5 steps at 512x512 that it is worth."""

    max_steps: int = 150
    max_size: int = 2048
    max_batch_size: int = 8
    max_batch_count: int = 8
    max_job_cost: float = 1250.0        # e.g. 8 images x 150 steps at 512x512 with SD v1.5 (1208)
    max_upload_pixels: int = 4096 * 4096

    def __post_init__(self):
        for item in fields(self):
            if not getattr(self, item.name) > 0:
                flag = f"--{item.name.replace('_', '-')}"
                raise UserError(f"{flag} must be > 0, got {getattr(self, item.name)}")

    def check(self, body, request, unet_parameters: int) -> None:
        """A UserError naming the field (or the cost) when `body` asks for more than these limits allow."""
        for name, limit in (("steps", self.max_steps), ("width", self.max_size), ("height", self.max_size),
                            ("batch_size", self.max_batch_size), ("n_iter", self.max_batch_count)):
            value = getattr(body, name)
            if value is not None and value > limit:
                raise UserError(f"{name}: {value} is more than this server's limit of {limit}")
        cost = job_cost(request, body.num_images, unet_parameters)
        if cost > self.max_job_cost:
            raise UserError(
                f"this job costs {cost:.0f} units ({body.num_images} images x {request.num_steps} steps at "
                f"{request.width}x{request.height} with this model), more than this server's limit of "
                f"{self.max_job_cost:g} (--max-job-cost; a unit is one SD v1.5 step at 512x512): ask for "
                "fewer images, steps or pixels")


def job_cost(request, num_images: int, unet_parameters: int) -> float:
    """The job's worth in SD v1.5 steps at 512x512 (see Limits)."""
    pixels = request.width * request.height / (512 * 512)
    return num_images * (request.num_steps + 1) * pixels * unet_parameters / SD15_UNET_PARAMETERS
