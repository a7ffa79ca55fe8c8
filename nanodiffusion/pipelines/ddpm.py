"""Sampling a pixel-space DDPM model: wires a UNet, its schedule and a sampler; writes grids, GIFs, PNGs."""

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.diffusion.denoisers import Denoiser, cfg_denoiser
from nanodiffusion.diffusion.sampler_options import schedule_inputs
from nanodiffusion.diffusion.samplers import SAMPLERS
from nanodiffusion.diffusion.sampling_plan import SchedulerSettings, final_latent, initial_noise_scale
from nanodiffusion.diffusion.schedules import ScheduleConfig, check_num_steps
from nanodiffusion.errors import UserError
from nanodiffusion.images import frame_steps, grid_shape, image_grid, save_gif, save_png, to_pil
from nanodiffusion.nets.ddpm_unet import DDPMUNet, DDPMUNetConfig
from nanodiffusion.pipelines.arguments import check_ddpm_call
from nanodiffusion.weights.checkpoint import load_checkpoint, load_module, require, save_checkpoint
from nanodiffusion.weights.models import model_path



@dataclass
class SampleResult:
    images: torch.Tensor            # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None     # (N,) class of each image, or None for an unconditional model
    frames: list                    # per recorded step, (N, C, H, W) tensors of x_t for the reverse-process GIF


class DDPMPipeline:
    """`DDPMPipeline(unet, schedule, prediction, class_names)`; `from_pretrained(path or builtin name)`."""

    def __init__(self, unet: DDPMUNet, schedule: ScheduleConfig, prediction: str = "epsilon",
                 class_names=None):
        self.unet = unet.eval()
        self.schedule = schedule
        self.class_names = tuple(class_names) if class_names else None
        # the grids of text-to-image, under diffusers' defaults for what a ScheduleConfig does not say
        self.scheduler = SchedulerSettings.from_schedule(schedule, prediction)
        self.denoiser = Denoiser(self._net, self.scheduler.alphas_cumprod, prediction)

    def _net(self, x, t, class_labels=None):
        return self.unet(x, t, class_labels=class_labels)

    @classmethod
    def from_pretrained(cls, path: str | Path = "fashion-mnist", *, use_ema: bool = True) -> "DDPMPipeline":
        """Load a checkpoint file written by training (its EMA weights by default) or a built-in model name."""
        path = model_path(path)
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != "ddpm":
            raise UserError(f"{path} is not a DDPM model checkpoint (kind={meta.get('kind')!r})")
        require(meta, path, "unet", "schedule", "prediction")
        for key in ("unet", "schedule"):
            if not isinstance(meta[key], dict):
                raise UserError(f"{path} is damaged: its {key!r} config is not a JSON object")
        unet = DDPMUNet(DDPMUNetConfig.from_dict(meta["unet"]))
        prefix = "ema" if use_ema and any(k.startswith("ema.") for k in tensors) else "model"
        load_module(unet, tensors, prefix, path)
        return cls(unet, ScheduleConfig.from_dict(meta["schedule"]), meta["prediction"], meta.get("class_names"))

    def save_pretrained(self, path: str | Path, *, dtype: torch.dtype = torch.float32, notes: dict | None = None) -> None:
        """Write a model-only checkpoint (the UNet's current weights and the config, no training state)."""
        meta = model_metadata(self.unet.config, self.schedule, self.denoiser.prediction, self.class_names)
        if notes:
            meta["notes"] = notes
        tensors = {f"model.{k}": v.to(dtype) for k, v in self.unet.state_dict().items()}
        save_checkpoint(path, tensors, meta)

    @property
    def num_classes(self) -> int:
        return self.unet.config.num_classes or 0

    def resolve_labels(self, num_images: int, labels) -> torch.Tensor | None:
        """Labels for each image: given ones (ints or class names) repeated, or cycling through all classes."""
        if not self.num_classes:
            if labels:
                raise UserError("this model is unconditional: it takes no --label")
            return None
        if not labels:
            return torch.arange(num_images) % self.num_classes
        ids = [self._label_id(label) for label in labels]
        return torch.tensor([ids[i % len(ids)] for i in range(num_images)])

    def _label_id(self, label) -> int:
        names = self.class_names or ()
        if isinstance(label, str) and not label.isdigit():
            lowered = [n.lower() for n in names]
            if label.lower() not in lowered:
                raise UserError(f"unknown class {label!r}; valid: {', '.join(names)}")
            return lowered.index(label.lower())
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise UserError(f"label {label} out of range: this model has classes 0..{self.num_classes - 1}")
        return label

    @torch.no_grad()
    def __call__(self, num_images: int = 16, *, sampler: str = "ddpm", num_steps: int = 1000, seed: int = 0,
                 guidance_scale: float = 1.0, labels=None, gif_frames: int = 0, progress: bool = True,
                 **sampler_options) -> SampleResult:
        """Draw `num_images` samples; `gif_frames > 0` records that many evenly spaced x_t of the reverse
        process. `sampler_options` are the sampler's own (diffusion/sampler_options.py), e.g. eta=0.5."""
        sampler = check_ddpm_call(num_images, sampler=sampler, num_steps=num_steps, seed=seed,
                                  guidance_scale=guidance_scale, labels=labels, gif_frames=gif_frames,
                                  options=sampler_options)
        check_num_steps(num_steps, self.schedule.num_timesteps)
        if gif_frames and not 2 <= gif_frames <= num_steps + 1:
            raise UserError(f"a GIF of the reverse process has 2 (x_T and the image) to steps + 1 = "
                            f"{num_steps + 1} frames, asked for {gif_frames}")
        sigmas = self.scheduler.sigmas(sampler, num_steps)
        class_labels = self.resolve_labels(num_images, labels)
        model = self._guided_model(class_labels, guidance_scale)
        generator = torch.Generator().manual_seed(seed)
        cfg = self.unet.config
        noise = torch.randn(num_images, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
        x = noise * initial_noise_scale(sampler, sigmas, spacing=self.scheduler.spacing)
        # the first frame is x_T, the others follow gif_frames - 1 evenly spaced steps (the last one at least)
        record = frame_steps(num_steps, gif_frames - 1) if gif_frames else set()
        frames = [_vp(x, sigmas[0]).clamp(-1, 1)] if gif_frames else []
        bar = tqdm(total=num_steps, desc="sampling", disable=not progress, leave=False)

        def callback(i, x_i, denoised):
            bar.update(1)
            if i in record:
                frames.append(_vp(x_i, sigmas[i + 1]).clamp(-1, 1))

        function = SAMPLERS[sampler].function
        # TCD reads the timesteps, PLMS extrapolates the network's own output (diffusers' PNDMScheduler)
        inputs = schedule_inputs(function, self.scheduler.alphas_cumprod, self.scheduler.prediction)
        x = function(model, x, sigmas, generator=generator, callback=callback, **inputs, **sampler_options)
        bar.close()
        x = final_latent(sampler, x, sigmas)
        return SampleResult(x.clamp(-1, 1), class_labels, frames)

    def _guided_model(self, class_labels, guidance_scale: float):
        if class_labels is None:
            return self.denoiser
        cond = {"class_labels": class_labels}
        uncond = {"class_labels": torch.full_like(class_labels, self.unet.null_class)}
        return cfg_denoiser(self.denoiser, cond, uncond, guidance_scale)

    def sample_grid(self, path: str | Path, *, num_images: int = 16, **kwargs) -> SampleResult:
        """Sample and save a near-square grid PNG (one row per class when sampling all classes)."""
        result = self(num_images, **kwargs)
        cols = self.num_classes if self.num_classes and num_images % self.num_classes == 0 else None
        save_png(image_grid(to_pil(result.images), *grid_shape(num_images, cols)), path)
        return result

    def label_name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)


def model_metadata(unet_config: DDPMUNetConfig, schedule: ScheduleConfig, prediction: str,
                   class_names=None) -> dict:
    """The JSON config stored with a model: what a sampler needs to rebuild and use it."""
    return {"kind": "ddpm", "unet": unet_config.to_dict(), "schedule": schedule.to_dict(),
            "prediction": prediction, "class_names": list(class_names) if class_names else None}


def _vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """x = x0 + sigma·eps in the network's variance-preserving scale, where images live in [-1, 1]."""
    return x / (1 + float(sigma) ** 2) ** 0.5


def save_reverse_gif(frames: list, path: str | Path, *, cols: int | None = None, hold_last_ms: int = 2000) -> None:
    """Write the recorded reverse process as an animated GIF of image grids, holding the last frame."""
    shape = grid_shape(frames[0].shape[0], cols)
    pictures = [image_grid(to_pil(f), *shape) for f in frames]
    save_gif(pictures, path, hold_last_ms=hold_last_ms)
