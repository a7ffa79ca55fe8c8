"""Stable Diffusion v1.x text-to-image (Rombach et al. 2022): prompt → CLIP states → sigmas → sampler → VAE
decode. img2img (`image=`, `strength=`) and inpainting (`mask_image=`) use the same wiring.

Random numbers all come from one generator, a CPU one by default (`seed=` builds it), so a seed gives the
same image on any device: first the start noise of the whole batch, one draw of shape
(len(prompts)·num_images_per_prompt, 4, H/8, W/8) with the images of a prompt next to each other, then the
stochastic samplers' step noise. diffusers' StableDiffusionPipeline draws the same numbers in the same order
from one generator, so both give the same images (tests/test_pipeline_parity.py).
"""

import random
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.diffusion.denoisers import (
    Denoiser, cfg_denoiser, inpainting_denoiser, lcm_boundary_condition,
)
from nanodiffusion.diffusion.sampler_options import schedule_inputs
from nanodiffusion.diffusion.samplers import SAMPLERS, resolve_sampler
from nanodiffusion.diffusion.sampling_plan import (
    SchedulerSettings, final_latent, img2img_sigmas, initial_noise_scale,
)
from nanodiffusion.errors import UserError
from nanodiffusion.images import to_pil
from nanodiffusion.nets.token_merging import merging_tokens
from nanodiffusion.nets.vae_tiling import decode_sliced, decode_tiled
from nanodiffusion.pipelines.adapter_methods import AdapterMethods
from nanodiffusion.pipelines.arguments import check_generate_inputs, diverged_message
from nanodiffusion.pipelines.control import attach_controlnets, call_settings, control_model, control_units
from nanodiffusion.pipelines.img2img import ImageInput, prepare_images, prepare_mask
from nanodiffusion.pipelines.prompts import count_chunks, encode_prompts
from nanodiffusion.pipelines.request import (
    GenerationRequest, TextToImageOutput, check_generation_defaults, read_generation_defaults,
)
from nanodiffusion.weights import file_pages, load_sd, load_vae
from nanodiffusion.weights.components import SD15_SCHEDULER, resolve_dtype
from nanodiffusion.validation import resolve_device
from nanodiffusion.weights.families import model_defaults
from nanodiffusion.weights.models import model_path


class TextToImage(AdapterMethods):
    """`TextToImage(unet, vae, text_encoder, tokenizer, scheduler_config)` or `from_pretrained(path)`;
    `pipe(prompt, ...)` returns a TextToImageOutput whose `.images` are PIL images by default.

    `generation_defaults` (read from a model folder's generation_defaults.json) replace GenerationRequest's
    defaults for num_steps, guidance_scale, sampler and sigma_schedule where a call gives none.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict | None = None, *,
                 generation_defaults: dict | None = None):
        if unet.config.context_dim != text_encoder.config.hidden_size:
            raise UserError(f"the UNet attends to {unet.config.context_dim}-wide text states but the text "
                            f"encoder gives {text_encoder.config.hidden_size}")
        if unet.config.in_channels != vae.config.latent_channels:
            raise UserError(f"the UNet takes {unet.config.in_channels} channels but the VAE makes "
                            f"{vae.config.latent_channels}-channel latents (9-channel inpainting UNets are "
                            "not supported)")
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or SD15_SCHEDULER)
        self.schedule = SchedulerSettings.from_diffusers_config(self.scheduler_config)
        self.denoiser = Denoiser(self._eps, self.schedule.alphas_cumprod, self.schedule.prediction)
        self.generation_defaults = check_generation_defaults(generation_defaults or {})
        self.show_progress = True
        self.embeddings: tuple[dict, dict] = ({}, {})     # (loaded, skipped) of load_embeddings_dir
        # Memory-bounded VAE decoding (nets/vae_tiling.py): tiles of this many latent pixels (None: whole
        # images), overlapping by vae_tile_overlap; vae_slicing decodes the images of a batch one by one.
        self.vae_tile_size: int | None = None
        self.vae_tile_overlap = 16
        self.vae_slicing = False
        # A cheap autoencoder (TAESD) for previews only (`decode_preview`); None: previews use `vae`.
        self.preview_vae: torch.nn.Module | None = None
        self.controlnets = {}           # name -> AttachedControlNet (pipelines/control.py)

    def _eps(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **residuals) -> torch.Tensor:
        """The UNet as the Denoiser calls it: latents stay float32 outside, the weights may be bf16/fp16;
        `residuals` are a ControlNet's (down_residuals, mid_residual)."""
        return self.unet(x.to(self.dtype), t, context, **residuals)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, *, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", tokenizer=None,
                        memory_format: torch.memory_format | None = None, vae=None, controlnet=None,
                        trust_pickle: bool = False) -> "TextToImage":
        """Load a diffusers folder, a single-file checkpoint, a Hugging Face repo id or a built-in model name
        ("builtin": `weights.models.model_path`). A single file holds no tokenizer: an SD v1.x one gets CLIP's
        (`CLIPTokenizer.clip()`), others need `tokenizer=` (`CLIPTokenizer.from_pretrained(folder)`). `vae`
        replaces the model's autoencoder: a module, an autoencoder folder (TAESD's AutoencoderTiny, or an
        AutoencoderKL) or a VAE file (A1111's; `weights.load_vae`). `controlnet`: ControlNets to attach
        (`load_controlnet`).

        `memory_format` lays the UNet's and VAE's conv weights out (see `to`); None picks channels_last for
        bf16 on a CPU (measured faster there for both networks: benchmarks/README.md) and leaves the rest.
        """
        path = model_path(path_or_repo)
        device = resolve_device(device)
        if memory_format is None:
            on_cpu = torch.device(device).type == "cpu"
            memory_format = torch.channels_last if on_cpu and resolve_dtype(dtype) == torch.bfloat16 \
                else torch.preserve_format
        # conv weights are laid out while loading: one copy each, even when the dtype changes too
        parts = load_sd(path, dtype=dtype, device=device, tokenizer=tokenizer,
                        memory_format=memory_format)
        if parts.tokenizer is None:
            raise UserError(f"{path_or_repo} holds no tokenizer and its text encoder is not CLIP's "
                            "(SD v1.x's): in Python pass tokenizer=CLIPTokenizer.from_pretrained(the model's "
                            "tokenizer folder); on the command line make it a diffusers folder first: "
                            "nanodiffusion convert FILE FOLDER --tokenizer TOKENIZER_FOLDER, then --model "
                            "FOLDER")
        if vae is not None:
            parts.vae = vae if isinstance(vae, torch.nn.Module) else load_vae(
                vae, dtype=dtype, device=device, memory_format=memory_format)
        # the model family's settings (SD-Turbo: 1 step, no guidance) and its scheduler class's sampler (DDIM
        # for SD 2.1), then the folder's own file
        defaults = {**model_defaults(parts.text_encoder.config, parts.scheduler_config),
                    **(read_generation_defaults(path) if path.is_dir() else {})}
        pipe = cls(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config,
                   generation_defaults=defaults)
        if controlnet is not None:
            pipe.load_controlnet(controlnet, trust_pickle=trust_pickle)
        return pipe

    def load_controlnet(self, controlnet, *, trust_pickle: bool = False, **label) -> list[str]:
        """Attach ControlNets (a path, a ControlNet module, or a list of them; `.pth` files only with
        trust_pickle) to `self.controlnets`; returns their names. Calls then take `control_image=`."""
        return attach_controlnets(self, controlnet, trust_pickle=trust_pickle, **label)

    @property
    def device(self) -> torch.device:
        """The UNet's device (where the networks are)."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight dtype (latents and sigmas stay float32)."""
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel along a side (8 for SD)."""
        return self.vae.config.downsample_factor

    @property
    def native_size(self) -> int:
        """The image size the UNet was trained at (512 for SD v1.x)."""
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * self.vae_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
           memory_format: torch.memory_format | None = None) -> "TextToImage":
        """Move (and cast) the networks, attached ControlNets too; returns the pipeline.

        `memory_format=torch.channels_last` stores the conv weights NHWC, and so runs their feature maps NHWC
        (faster in bf16 on an AVX-512 CPU: benchmarks/README.md). Tensors are converted one at a time, the
        file pages of those replaced given back: a conversion never holds two copies of the weights.
        """
        controlnets = [attached.network for attached in self.controlnets.values()]
        for module in (self.unet, self.vae, self.text_encoder, *controlnets):
            layout = memory_format if module is not self.text_encoder else None

            def change(tensor: torch.Tensor, layout=layout) -> torch.Tensor:
                cast = dtype if tensor.is_floating_point() else None
                return tensor.to(device=device, dtype=cast, memory_format=layout if layout is not None
                                 and tensor.dim() == 4 else torch.preserve_format)
            # tensor by tensor, giving back the file pages of the weights it replaces (file_pages)
            file_pages.convert_module(module, change)
        return self

    def compile(self, **options) -> "TextToImage":
        """`torch.compile` the UNet and the VAE decoder in place; `options` go to `torch.compile`.

        Opt-in, and measure before you use it: the first call compiles for minutes on a small CPU, and on the
        2-core AVX512-BF16 CPU of benchmarks/README.md the compiled bf16 UNet step ran *slower* than eager
        (1.55 s against 1.22 s at 256²: inductor's generated GroupNorm/elementwise kernels took 0.24 s where
        ATen's take 0.05 s, while the convolutions, matmuls and attention stay the same oneDNN calls).
        """
        self.unet.compile(**options)
        self.vae.decoder.compile(**options)
        return self

    def sigmas(self, sampler: str, num_steps: int, sigma_schedule: str = "default") -> torch.Tensor:
        """The float64 sigma grid of `sampler` (see SchedulerSettings.sigmas)."""
        return self.schedule.sigmas(sampler, num_steps, sigma_schedule)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 image: ImageInput | None = None, mask_image: ImageInput | None = None,
                 output_type: str = "pil", callback=None, num_inference_steps: int | None = None,
                 control_image=None, **settings) -> TextToImageOutput:
        """Generate images; `settings` are GenerationRequest fields (guidance_scale, seed, height, ...).

        `num_inference_steps` is diffusers' name for `num_steps`; the other arguments are `generate`'s.
        ControlNets take `control_image` (one per ControlNet) and the settings of control.CALL_SETTINGS.
        """
        if num_inference_steps is not None:
            if "num_steps" in settings:
                raise UserError("pass num_steps or num_inference_steps, not both")
            settings["num_steps"] = num_inference_steps
        control_images = call_settings(self, settings, control_image)
        request = GenerationRequest.from_settings(prompt, negative_prompt,
                                                  **{**self.generation_defaults, **settings})
        return self.generate(request, generator=generator, latents=latents, image=image,
                             mask_image=mask_image, output_type=output_type, callback=callback,
                             control_image=control_images or None)

    @torch.no_grad()
    def generate(self, request: GenerationRequest, *, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, image: ImageInput | None = None,
                 mask_image: ImageInput | None = None, output_type: str = "pil",
                 callback=None, control_image: list | None = None) -> TextToImageOutput:
        """Run `request`. `latents`: the start noise, N(0, I) of shape (N, 4, H/8, W/8), instead of a draw;
        `image`: init image(s) for img2img, one or one per prompt; `mask_image`: repaint where it is white;
        `callback(i, x, denoised)` runs after each step (`decode_latents(denoised)` previews it);
        `control_image`: one per request.controls (else read from the files they name).
        """
        check_generate_inputs(self, request, generator=generator, latents=latents, image=image,
                              mask_image=mask_image, output_type=output_type, callback=callback)
        init_images = prepare_images(image) if image is not None else None
        request, generator = self._settle(request, generator, init_images)
        units, request = control_units(self, request, control_image)
        sampler = resolve_sampler(request.sampler)
        texts = self.prompt_loras.apply(request.prompts)              # <lora:NAME:W> tags applied, then cut
        sigmas = self.sigmas(sampler, request.num_steps, request.sigma_schedule)
        if init_images is not None:
            sigmas = img2img_sigmas(sigmas, request.strength)          # ControlNets run on these steps
        model = self._guided_denoiser(replace(request, prompt=texts), units, sigmas)
        if init_images is None:
            noise = self._noise(request, generator, latents)
            x = noise * initial_noise_scale(sampler, sigmas, spacing=self.schedule.spacing)
        else:
            original = self._init_latents(init_images, request, generator)       # drawn first, as diffusers
            noise = self._noise(request, generator, latents)
            x = original + noise * float(sigmas[0])
            if mask_image is not None:
                mask = prepare_mask(mask_image, request.height, request.width, self.vae_factor)
                mask = mask.to(self.device)
                model = inpainting_denoiser(model, original, noise, mask)
        with merging_tokens(self.unet, request.tome_ratio, request.seed or 0):     # no-op at ratio 0
            x = self._sample(sampler, model, x, sigmas, generator, callback, request.sampler_options)
        x = final_latent(sampler, x, sigmas)
        if not x.isfinite().all():
            raise UserError(diverged_message(self.dtype, request.guidance_scale))
        if mask_image is not None:
            x = mask * x + (1 - mask) * original              # DDIM and PLMS end above sigma = 0
        return TextToImageOutput(self._postprocess(x, output_type), request)

    def _settle(self, request: GenerationRequest, generator, init_images):
        """Fill in the size and the seed; return the request and the generator to draw from."""
        if init_images is not None:
            height, width = init_images.shape[2:]
            if height % 8 or width % 8:
                raise UserError(f"the init image is {width}x{height}: its sides must be multiples of 8 "
                                "(resize or crop it first)")
            asked = (request.width or width, request.height or height)
            if asked != (width, height):
                raise UserError(f"the init image is {width}x{height} but the request asks for "
                                f"{asked[0]}x{asked[1]}")
            if len(init_images) not in (1, len(request.prompts)):
                raise UserError(f"pass one init image or one per prompt ({len(request.prompts)}), "
                                f"got {len(init_images)}")
        else:
            height, width = request.height or self.native_size, request.width or self.native_size
        if generator is not None and request.seed is not None:
            raise UserError("pass seed or generator, not both")
        if generator is None:
            seed = request.seed if request.seed is not None else random.randrange(2**32)
            generator = torch.Generator().manual_seed(seed)
            request = replace(request, seed=seed)
        return replace(request, height=height, width=width), generator

    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None = None, *,
                      clip_skip: int = 1, emphasis: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP states (B, 77·K, D) of the prompts and, if given, of the negative prompts, in the UNet's
        dtype; both sides are padded to the same number K of 77-token chunks, encoded in one call."""
        texts = prompts + (negative_prompts or [])
        num_chunks = max(count_chunks(self.tokenizer, text, emphasis=emphasis) for text in texts)
        states = encode_prompts(self.text_encoder, self.tokenizer, texts, num_chunks=num_chunks,
                                clip_skip=clip_skip, emphasis=emphasis).to(self.dtype)
        return states[:len(prompts)], (states[len(prompts):] if negative_prompts else None)

    def _guided_denoiser(self, request: GenerationRequest, units=(), sigmas=None):
        """D(x, sigma) for the whole batch: each prompt repeated per image, classifier-free guidance as one
        batched UNet call; none at guidance <= 1 (diffusers' rule, so SD-Turbo's guidance 0 is one call).
        ControlNet `units` add their residuals on their fraction of the grid `sigmas`."""
        guided = request.guidance_scale > 1
        cond, uncond = self.encode_prompt(request.prompts, request.negative_prompts if guided else None,
                                          clip_skip=request.clip_skip, emphasis=request.emphasis)
        n = request.num_images_per_prompt
        cond = {"context": cond.repeat_interleave(n, dim=0)}                     # (N, 77·K, D)
        uncond = {"context": uncond.repeat_interleave(n, dim=0)} if guided else None
        denoiser, cond, uncond = control_model(self, units, sigmas, cond, uncond) if units else \
            (self.denoiser, cond, uncond)
        model = cfg_denoiser(denoiser, cond, uncond, request.guidance_scale if guided else 1.0)
        if resolve_sampler(request.sampler) == "lcm":
            model = lcm_boundary_condition(model, self.schedule.alphas_cumprod)
        return model

    def _latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        batch = len(request.prompts) * request.num_images_per_prompt
        f = self.vae_factor
        return batch, self.vae.config.latent_channels, request.height // f, request.width // f

    def _noise(self, request: GenerationRequest, generator: torch.Generator, latents) -> torch.Tensor:
        """The start noise N(0, I), drawn in float32 on the generator's device (the CPU by default)."""
        shape = self._latent_shape(request)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise UserError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(self.device, torch.float32)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    def _init_latents(self, images: torch.Tensor, request: GenerationRequest, generator) -> torch.Tensor:
        """Scaled latents of the init images, one posterior draw each, repeated for each output image."""
        vae_dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode(images.to(self.device, vae_dtype))
        if isinstance(posterior, torch.Tensor):            # TAESD's encoder is deterministic: no draw
            latents = posterior.float()
        else:
            # posterior.sample(generator) would draw on the VAE's device; we draw on the generator's
            # (portable)
            draw = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
            latents = (posterior.mean + posterior.std * draw.to(self.device, vae_dtype)).float()
        latents = latents * self.vae.config.scaling_factor
        return latents.repeat_interleave(self._latent_shape(request)[0] // len(latents), dim=0)

    def _sample(self, sampler: str, model, x, sigmas, generator, callback, options: dict) -> torch.Tensor:
        bar = tqdm(total=len(sigmas) - 1, desc="sampling", disable=not self.show_progress, leave=False)

        def step(i, x_i, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, x_i, denoised)

        function = SAMPLERS[sampler].function
        # TCD reads the timesteps, PLMS extrapolates the network's own output (diffusers' PNDMScheduler)
        inputs = schedule_inputs(function, self.schedule.alphas_cumprod, self.schedule.prediction)
        x = function(model, x, sigmas, generator=generator, callback=step, **inputs, **options)
        bar.close()
        return x

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in about [-1, 1], float32, from scaled latents (B, 4, h, w).

        NaNs from a float16 VAE (it overflows on some latents) are reported and the VAE is upcast to float32.
        """
        if not latents.isfinite().all():
            raise UserError(diverged_message(self.dtype))
        z = latents / self.vae.config.scaling_factor
        vae_dtype = next(self.vae.parameters()).dtype
        images = self._decode(z.to(self.device, vae_dtype))
        if not images.isfinite().all() and vae_dtype != torch.float32:
            warnings.warn(f"the VAE overflowed in {vae_dtype} (NaN pixels): decoding in float32 from now on",
                          stacklevel=2)
            self.vae.float()
            images = self._decode(z.to(self.device, torch.float32))
        if not images.isfinite().all():
            raise UserError("the VAE produced NaN pixels from finite latents")
        return images

    @torch.no_grad()
    def decode_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Like `decode_latents`, through `preview_vae` when one is set (TAESD: a small fraction of the VAE's
        time, pixels close to but not the VAE's); for live previews and GIF frames, never the final image."""
        if self.preview_vae is None:
            return self.decode_latents(latents)
        vae = self.preview_vae
        weight = next(vae.parameters())
        return vae.decode((latents / vae.config.scaling_factor).to(weight.device, weight.dtype)).float()

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 images of unscaled latents, tiled and/or one image at a time as the pipeline is set."""
        def decode(latents: torch.Tensor) -> torch.Tensor:
            if self.vae_tile_size is None:
                return self.vae.decode(latents).float()
            return decode_tiled(self.vae.decode, latents, tile_size=self.vae_tile_size,
                                overlap=self.vae_tile_overlap, factor=self.vae_factor)

        return decode_sliced(decode, z) if self.vae_slicing else decode(z)

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        if output_type == "np":
            return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()     # (N, H, W, 3)
        return to_pil(images)
