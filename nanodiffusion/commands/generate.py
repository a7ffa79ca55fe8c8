"""Generate images from a text prompt with a Stable Diffusion v1.x model (diffusers folder, single file or
Hugging Face repo id).

Every PNG carries A1111's `parameters` text and our exact settings as JSON, so `generate --from IMAGE.png`
makes the same image again (bit for bit with the same model, dtype and device; flags given with --from
change that setting). With -n N, image k gets seed + k and is generated on its own, so each PNG replays alone.
"""

import argparse
import random
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.atomic import check_output_file, check_output_folder
from nanodiffusion.commands.generate_control import (
    add_control_arguments, attach_controls, control_values,
)
from nanodiffusion.commands.sampler_flags import add_sampler_option_flags, sampler_option_flags
from nanodiffusion.diffusion.samplers import resolve_sampler
from nanodiffusion.diffusion.sampling_plan import SIGMA_SCHEDULES
from nanodiffusion.errors import UserError
from nanodiffusion.images import (
    frame_steps, grid_shape, image_grid, read_png_text, save_gif, save_png, to_pil,
)
from nanodiffusion.pipelines.arguments import check_request_for_model
from nanodiffusion.pipelines.image_loop import generate_each
from nanodiffusion.pipelines.memory import check_generation_fits
from nanodiffusion.pipelines.metadata import ModelRecord, read_settings
from nanodiffusion.pipelines.request import GenerationRequest
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights import load_vae
from nanodiffusion.validation import check_seed, finite_float, resolve_device
from nanodiffusion.weights.components import DTYPES
from nanodiffusion.weights.models import DEFAULT_TEXT_TO_IMAGE, model_hash, model_path

DEFAULT_OUT = "image.png"
DEFAULTS = {field.name: field.default for field in fields(GenerationRequest)}
SUPPRESS = argparse.SUPPRESS    # flags not given stay unset, so that --from can tell them apart
# optional flags without a setting
UNSET_IS_NONE = ("from_image", "out", "out_dir", "gif", "device", "preview_vae")

MIN_VAE_TILE = 32                       # latent pixels: tiles overlap by 16 (TextToImage.vae_tile_overlap)
GIF_PREVIEWS = 10                       # default previews in a GIF, at most one per step
MAX_IMAGES = 100_000                    # -n: one PNG each; more in one run is surely a typo


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", default=SUPPRESS,
                   help="the prompt; A1111 emphasis is read: (word:1.3), (word), [word], \\( for a bracket")
    p.add_argument("--model", default=SUPPRESS,
                   help=f"diffusers folder, .safetensors/.ckpt file or Hugging Face repo id "
                        f"(default: {DEFAULT_TEXT_TO_IMAGE})")
    p.add_argument("--negative", dest="negative_prompt", default=SUPPRESS, help="negative prompt")
    p.add_argument("--steps", dest="num_steps", type=int, default=SUPPRESS,
                   help=f"sampling steps (default: the model's, else {DEFAULTS['num_steps']})")
    p.add_argument("--guidance", dest="guidance_scale", type=finite_float, default=SUPPRESS,
                   help="classifier-free guidance scale, 1 = none (default: the model's, else "
                        f"{DEFAULTS['guidance_scale']})")
    p.add_argument("--seed", type=int, default=SUPPRESS,
                   help="seed of the first image, image k gets seed + k (default: random)")
    p.add_argument("--size", type=_size, default=SUPPRESS,
                   help="image size WxH, or one number for a square (default: the model's, 512 for SD v1.x)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="number of images")
    p.add_argument("--sampler", default=SUPPRESS,
                   help=f"sampler: pndm, ddim, euler, euler_a, dpmpp_2m, lms, heun, unipc, ... "
                        f"(default: the model's, else {DEFAULTS['sampler']})")
    p.add_argument("--sigma-schedule", dest="sigma_schedule", choices=SIGMA_SCHEDULES, default=SUPPRESS,
                   help="sigma grid (default: default, the scheduler's own timesteps)")
    add_sampler_option_flags(p)
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=SUPPRESS,
                   help="2 = condition on CLIP's penultimate layer (default: 1)")
    p.add_argument("--tome", dest="tome_ratio", type=finite_float, default=SUPPRESS, metavar="R",
                   help="token merging (ToMe for SD): merge this fraction of the tokens before each "
                        "full-resolution self-attention, 0-0.75; faster, the image changes a little "
                        "(default: 0, off; benchmarks/README.md)")
    p.add_argument("--lora", dest="loras", type=_lora, action="append", default=SUPPRESS,
                   metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file (kohya/A1111 or diffusers) with this weight (default 1); repeatable")
    p.add_argument("--lora-dir", dest="lora_dir", default=SUPPRESS, metavar="DIR",
                   help="folder of LoRA files that <lora:NAME:WEIGHT> in the prompt names (A1111's syntax)")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=SUPPRESS, metavar="DIR",
                   help="folder of textual-inversion embeddings: each file's name becomes a prompt word")
    p.add_argument("--dtype", choices=list(DTYPES), default=SUPPRESS, help="weights dtype (default: fp32)")
    p.add_argument("--device", default=SUPPRESS, help="device (default: cuda if available, else cpu)")
    p.add_argument("--vae-tile", dest="vae_tile", type=int, default=SUPPRESS, metavar="N",
                   help="decode in overlapping tiles of N latent pixels (8N image pixels), blended: bounds "
                        "the memory of large images, pixels differ slightly from a whole decode (default: "
                        f"whole images; N >= {MIN_VAE_TILE})")
    p.add_argument("--vae", default=SUPPRESS, metavar="PATH",
                   help="replace the model's autoencoder: a diffusers folder (TAESD's AutoencoderTiny, e.g. "
                        "madebyollin/taesd, or an AutoencoderKL) or a VAE file (.safetensors; A1111's); "
                        "recorded in the PNG and replayed by --from")
    p.add_argument("--preview-vae", dest="preview_vae", default=SUPPRESS, metavar="PATH",
                   help="decode the --gif frames with this autoencoder (a TAESD folder: a small fraction of "
                        "the VAE's time); the PNGs still use the model's VAE (or --vae). With a TAESD --vae "
                        "the frames are cheap already")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", default=SUPPRESS,
                     help=f"output PNG; with -n N, STEM-k.png (default: {DEFAULT_OUT})")
    out.add_argument("--out-dir", default=SUPPRESS, help="write DIR/00000-SEED.png, DIR/00001-SEED.png, ...")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid (STEM-grid.png)")
    p.add_argument("--gif", default=SUPPRESS,
                   help="write an animated GIF of the denoising: decoded x0 previews")
    p.add_argument("--gif-frames", type=int, default=None,
                   help=f"previews in the GIF, the final image after them (default: {GIF_PREVIEWS}, or one "
                        "per step when there are fewer steps)")
    p.add_argument("--from", dest="from_image", default=SUPPRESS,
                   help="replay the settings stored in a PNG made by this command")
    add_control_arguments(p)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WxH or one number, got {text!r}") from None
    return width, height


def _lora(text: str) -> tuple[str, float]:
    """--lora PATH[:WEIGHT]: the weight follows the last colon when that is a number (a path may hold one)."""
    path, colon, weight = text.rpartition(":")
    if colon:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def build_request(args) -> tuple[GenerationRequest, dict]:
    """The request and the run settings (model, dtype, device, and "chosen": the request fields that --from's
    PNG or a flag set): --from's PNG, then the flags given."""
    given = vars(args)
    stored = {}
    run = {"model": DEFAULT_TEXT_TO_IMAGE, "dtype": "fp32", "model_hash": None, "device": None,
           "vae_tile": None, "loras": [], "lora_dir": None, "embeddings_dir": None, "lora_hashes": {},
           "vae": None, "vae_hash": None}
    if args.from_image:
        stored, recorded = _stored_settings(args.from_image)
        run.update({key: recorded[key] for key in run if key in recorded})
    values = {**stored, **{name: given[name] for name in DEFAULTS if name in given}}
    # checked once the sampler is known, which may be the model's default (run)
    run["sampler_options"] = {**values.pop("sampler_options", {}), **sampler_option_flags(args)}
    if "size" in given:
        values["width"], values["height"] = given["size"]
    values["controls"] = control_values(given, stored.get("controls", []))
    if "prompt" not in values:
        raise UserError("give a PROMPT (or --from IMAGE.png to replay one)")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"the number of images must be from 1 to {MAX_IMAGES:,}, got {args.num_images}")
    if values.get("seed") is None:
        values["seed"] = random.randrange(2**32)
    values["num_images_per_prompt"] = 1                 # one image per call: each PNG replays alone
    for key in ("model", "dtype", "vae_tile", "loras", "lora_dir", "embeddings_dir", "vae"):
        run[key] = given.get(key, run[key])
    if run["vae_tile"] is not None and run["vae_tile"] < MIN_VAE_TILE:
        raise UserError(f"--vae-tile must be >= {MIN_VAE_TILE} latent pixels (tiles overlap by 16), "
                        f"got {run['vae_tile']}")
    run["chosen"] = set(values)
    request = GenerationRequest.from_dict(values)
    check_seed(request.seed, args.num_images, "--seed")          # image k has seed + k
    return request, run


def _stored_settings(png: str) -> tuple[dict, dict]:
    """The request of a PNG made by this command, checked alone (so that an error names the file), and its
    other settings."""
    settings = read_settings(read_png_text(png), png)
    if settings.get("img2img"):
        raise UserError(f"{png} was made by img2img from an init image that the PNG does not hold: --from "
                        "replays text-to-image PNGs only")
    if settings["dtype"] not in DTYPES:
        raise UserError(f"{png}: its settings name the dtype {settings['dtype']!r}; "
                        f"valid: {', '.join(DTYPES)}")
    try:
        GenerationRequest.from_dict(settings["request"])
    except UserError as error:
        raise type(error)(f"{png}: its stored settings are not valid: {error}") from None
    return settings["request"], settings


def output_paths(args, seeds: list[int]) -> tuple[list[Path], Path]:
    """One path per image and the grid's path."""
    if args.out_dir is not None:
        folder = Path(args.out_dir)
        paths = [folder / f"{k:05d}-{seed}.png" for k, seed in enumerate(seeds)]
        return paths, folder / f"grid-{seeds[0]}.png"
    out = Path(args.out if args.out is not None else DEFAULT_OUT)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    paths = [out] if len(seeds) == 1 else [out.with_name(f"{out.stem}-{k}.png") for k in range(len(seeds))]
    return paths, out.with_name(f"{out.stem}-grid.png")


def check_outputs(args, paths: list[Path], grid_path: Path) -> None:
    """Every file this run writes can be written: checked before the model loads."""
    if args.out_dir is not None:
        check_output_folder(args.out_dir, "--out-dir")
    if args.gif_frames is not None and args.gif_frames < 1:
        raise UserError(f"--gif-frames must be >= 1, got {args.gif_frames}")
    flag = "--out-dir" if args.out_dir is not None else "--out"
    for path, what in [*((path, flag) for path in paths), *([(grid_path, "--grid")] if args.grid else []),
                       *([(args.gif, "--gif")] if args.gif is not None else [])]:
        check_output_file(path, what, suffix=".gif" if what == "--gif" else ".png")


def run(args) -> None:
    for name in UNSET_IS_NONE:
        setattr(args, name, getattr(args, name, None))
    request, settings = build_request(args)
    seeds = [request.seed + k for k in range(args.num_images)]
    paths, grid_path = output_paths(args, seeds)
    check_outputs(args, paths, grid_path)
    device = resolve_device(args.device)
    path = model_path(settings["model"])
    digest = model_hash(path)
    if args.from_image:
        _warn_if_different(settings, digest, device.type)
    if settings["vae"] is not None and not Path(settings["vae"]).exists():
        raise UserError(f"--vae {settings['vae']}: no such file or folder")
    vae_hash = model_hash(settings["vae"]) if settings["vae"] is not None else None
    pipe = TextToImage.from_pretrained(path, dtype=DTYPES[settings["dtype"]], device=device,
                                       vae=settings["vae"])
    _set_preview_vae(pipe, args)
    pipe.show_progress = False
    if "dtype" not in vars(args) and not args.from_image:
        _hint_bf16(pipe)
    pipe.vae_tile_size = settings["vae_tile"]
    request = attach_controls(pipe, request, trust_pickle=args.trust_pickle, replaying=bool(args.from_image))
    # the model's own defaults (the built-in model's guidance, sampler, steps) where nothing chose a value
    request = replace(request, sampler_options=settings["sampler_options"],
                      **{key: value for key, value in pipe.generation_defaults.items()
                         if key not in settings["chosen"]})
    check_request_for_model(pipe, request)
    check_generation_fits(pipe, request, paths[0].parent, len(seeds))
    args.gif_frames = _gif_previews(args, request.num_steps)
    _load_adapters(pipe, request, settings, replaying=bool(args.from_image))
    model = ModelRecord(settings["model"], path, digest, settings["dtype"], device.type, settings["vae_tile"],
                        tuple((str(p), w) for p, w in settings["loras"]), settings["lora_dir"],
                        settings["embeddings_dir"], vae=settings["vae"], vae_hash=vae_hash)
    _generate(args, pipe, request, model, paths, grid_path)


def _gif_previews(args, num_steps: int) -> int:
    """The previews of --gif: as asked, at most one per step; by default GIF_PREVIEWS or one per step."""
    if args.gif is None:
        return 0
    if args.gif_frames is None:
        return min(GIF_PREVIEWS, num_steps)
    if args.gif_frames > num_steps:
        raise UserError(f"--gif-frames must be from 1 to the number of steps ({num_steps}): one preview per "
                        f"step at most, got {args.gif_frames}")
    return args.gif_frames


def _generate(args, pipe: TextToImage, request: GenerationRequest, model: ModelRecord, paths: list[Path],
              grid_path: Path) -> None:
    """Make and write the images (each as it is done), then the grid and the GIF."""
    previews = frame_steps(request.num_steps, args.gif_frames) if args.gif_frames else set()
    progress = _Progress(pipe, request, len(paths), previews)
    images, texts = [], []
    for out, (image, text, done, _) in zip(paths, generate_each(pipe, request, len(paths), model,
                                                                progress=progress)):
        progress.finish(image)
        save_png(image, out, text)
        print(f"wrote {out} (seed {done.seed})")
        images.append(image)
        texts.append(text)
    shape = grid_shape(len(images))
    if args.grid:
        save_png(image_grid(images, *shape), grid_path, texts[0])      # A1111 grids carry image 0's text
        print(f"wrote {grid_path}")
    if args.gif:
        save_gif([image_grid(list(step), *shape) for step in zip(*progress.animations)], args.gif)
        print(f"wrote {args.gif} ({len(progress.animations[0])} frames)")


def _load_adapters(pipe: TextToImage, request: GenerationRequest, settings: dict, replaying: bool) -> None:
    """--embeddings-dir, the --lora files with their weights and --lora-dir; then a hint when an LCM-LoRA
    runs with other settings than LCM's, and a warning when a replay's LoRA files changed."""
    if settings["embeddings_dir"]:
        for name, info in pipe.load_embeddings_dir(settings["embeddings_dir"])[1].items():
            print(f"warning: embedding {name} skipped: {info['error']}", file=sys.stderr)
    names = [pipe.load_lora_weights(path) for path, _ in settings["loras"]]
    if names:
        pipe.set_adapters(names, [weight for _, weight in settings["loras"]])
    pipe.set_lora_dir(settings["lora_dir"])
    pipe.prompt_loras.apply(request.prompts)            # the prompt's <lora:...>, checked before any image
    hint = pipe.lora.lcm_hint(resolve_sampler(request.sampler), request.num_steps, request.guidance_scale)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    if replaying and settings["lora_hashes"] and settings["lora_hashes"] != pipe.lora_hashes():
        print(f"warning: the LoRAs' hashes {pipe.lora_hashes()} differ from the recorded "
              f"{settings['lora_hashes']}: the image will differ", file=sys.stderr)


class _Progress:
    """A progress bar per image, and each image's GIF frames: x0 previews after the `previews` steps, then the
    image itself (see image_loop.generate_each for the calls)."""

    def __init__(self, pipe: TextToImage, request: GenerationRequest, num_images: int, previews: set[int]):
        self.pipe, self.request, self.num_images, self.previews = pipe, request, num_images, previews
        self.bar, self.animations = None, []

    def __call__(self, k: int, steps_done: int, denoised) -> None:
        if steps_done == 0:
            self.bar = tqdm(total=self.request.num_steps, leave=False,
                            desc=f"image {k + 1}/{self.num_images} (seed {self.request.seed + k})")
            self.animations.append([])
            return
        self.bar.update(1)
        if steps_done - 1 in self.previews:
            self.animations[-1].extend(to_pil(self.pipe.decode_preview(denoised)))

    def finish(self, image) -> None:
        self.bar.close()
        if self.previews:
            self.animations[-1].append(image)


def _set_preview_vae(pipe: TextToImage, args) -> None:
    """Load --preview-vae into the pipeline; it only decodes GIF frames, so it needs --gif."""
    if args.preview_vae is None:
        return
    if not args.gif:
        raise UserError("--preview-vae decodes the --gif frames: give --gif too")
    preview = load_vae(args.preview_vae, dtype=pipe.dtype, device=pipe.device)
    made = (pipe.vae.config.latent_channels, pipe.vae_factor)
    if (preview.config.latent_channels, preview.config.downsample_factor) != made:
        raise UserError(f"--preview-vae {args.preview_vae} decodes {preview.config.latent_channels}-channel "
                        f"latents {preview.config.downsample_factor}x, the model's VAE {made[0]}-channel "
                        f"latents {made[1]}x")
    pipe.preview_vae = preview


BF16_HINT_PARAMETERS = 100_000_000      # UNets this large (SD v1.x: 860M) gain ~2x from bf16 on such a CPU


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo on Linux):
    there bf16 convolutions and matmuls run about twice as fast as fp32, elsewhere they are emulated."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _hint_bf16(pipe: TextToImage) -> None:
    """Say so when a large model runs in fp32 on a CPU that computes bf16 natively (fp32 stays the default:
    the same seed then gives the same image on every CPU)."""
    if pipe.device.type != "cpu" or pipe.dtype != torch.float32 or not cpu_has_native_bf16():
        return
    if sum(p.numel() for p in pipe.unet.parameters()) >= BF16_HINT_PARAMETERS:
        print("hint: this CPU computes bf16 natively: --dtype bf16 runs this model about 2x faster "
              "(pixels differ by bf16 rounding; benchmarks/README.md)", file=sys.stderr)


def _warn_if_different(settings: dict, digest: str, device: str) -> None:
    if settings.get("model_hash") and settings["model_hash"] != digest:
        print(f"warning: the model's hash {digest} differs from the recorded {settings['model_hash']}: "
              "the image will differ", file=sys.stderr)
    if settings.get("device") and settings["device"] != torch.device(device).type:
        print(f"warning: recorded on {settings['device']}, running on {device}: pixels may differ slightly",
              file=sys.stderr)
