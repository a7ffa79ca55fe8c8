"""Serve a Stable Diffusion v1.x model over HTTP: a web page (prompt, settings, previews, img2img, gallery)
and AUTOMATIC1111's API (POST /sdapi/v1/txt2img, /sdapi/v1/img2img, GET /sdapi/v1/progress, ...), so A1111
clients work unchanged.

Generations run one at a time from a bounded queue; when it is full the server answers 429. It binds to
127.0.0.1 by default and answers only to local host names; binding elsewhere needs --api-key.
"""

import os
from pathlib import Path

from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.validation import finite_float, resolve_device
from nanodiffusion.weights.components import DTYPES
from nanodiffusion.weights.models import DEFAULT_TEXT_TO_IMAGE, model_hash, model_path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "NANODIFFUSION_API_KEY"
LIMIT_FLAGS = {                                     # Limits field: (type, what it bounds)
    "max_steps": (int, "sampling steps of an image"), "max_size": (int, "width and height, pixels"),
    "max_batch_size": (int, "batch_size, images per batch"), "max_batch_count": (int, "n_iter, batches"),
    "max_job_cost": (finite_float,
                     "a job's cost: images x (steps + 1) x pixels / 512² x UNet size / SD v1.5's"),
}


def add_arguments(p) -> None:
    from nanodiffusion.server.limits import Limits         # free of FastAPI and pydantic

    p.add_argument("--model", default=DEFAULT_TEXT_TO_IMAGE,
                   help="diffusers folder, .safetensors file or Hugging Face repo id served first "
                        f"(default: {DEFAULT_TEXT_TO_IMAGE}, the built-in model)")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder of models (diffusers folders, .safetensors files) that clients may switch "
                        "to by name; repeatable")
    p.add_argument("--controlnet-dir", action="append", default=[], metavar="DIR",
                   help="a folder of ControlNets (diffusers folders, .safetensors files) that requests may "
                        "use through A1111's ControlNet-extension API; repeatable")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; beyond localhost --api-key is required")
    p.add_argument("--port", type=int, default=7860, help="port (A1111's default); 0: a free one")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host header names NAME (the bound address and localhost "
                        "names always are); '*': any; repeatable")
    p.add_argument("--api-key", default=None,
                   help=f"require this key (Bearer, or HTTP Basic password) on every request; None: "
                        f"${API_KEY_ENV} if set")
    p.add_argument("--queue-size", type=int, default=8,
                   help="jobs that may wait besides the running one; more get HTTP 429")
    p.add_argument("--keep-jobs", type=int, default=100, help="finished jobs kept retrievable (count)")
    p.add_argument("--keep-minutes", type=finite_float, default=60.0,
                   help="finished jobs kept retrievable (minutes)")
    defaults = Limits()
    for name, (kind, what) in LIMIT_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name),
                       help=f"the most a request may ask for: {what}")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="folder of LoRA files that <lora:NAME:WEIGHT> in prompts names (GET /sdapi/v1/loras)")
    p.add_argument("--embeddings-dir", metavar="DIR",
                   help="folder of textual-inversion embeddings, each file's name a prompt word "
                        "(GET /sdapi/v1/embeddings)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype")
    p.add_argument("--device", default=None, help="device; None: cuda if available, else cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def run(args) -> None:
    try:
        import uvicorn

        from nanodiffusion.server.app import create_app
        from nanodiffusion.server.controlnets import ControlNetRegistry
        from nanodiffusion.server.limits import Limits
        from nanodiffusion.server.models import ModelRegistry
        from nanodiffusion.server.service import ServerSettings
    except ImportError as error:
        raise UserError(f"the server needs FastAPI and uvicorn ({error}): "
                        "pip install 'nanodiffusion[serve]'") from None
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = _settings(args, Limits(**{name: getattr(args, name) for name in LIMIT_FLAGS}), ServerSettings)
    dirs = [Path(folder) for folder in args.models_dir]
    controlnet_dirs = [Path(folder) for folder in args.controlnet_dir]
    for flag, folders in (("--models-dir", dirs), ("--controlnet-dir", controlnet_dirs)):
        for folder in folders:
            if not folder.is_dir():
                raise UserError(f"{flag} {folder}: no such folder")
    device = resolve_device(args.device)

    def load(path: Path) -> TextToImage:
        pipe = TextToImage.from_pretrained(path, dtype=DTYPES[args.dtype], device=device)
        pipe.show_progress = False
        pipe.set_lora_dir(args.lora_dir)
        if args.embeddings_dir:
            skipped = pipe.load_embeddings_dir(args.embeddings_dir)[1]
            if skipped:
                print(f"embeddings skipped (GET /sdapi/v1/embeddings says why): {', '.join(skipped)}")
        return pipe

    path = model_path(args.model)
    # clients see the model's name, never where it is on this machine
    name = args.model if args.model == DEFAULT_TEXT_TO_IMAGE or not Path(args.model).exists() else path.name
    model = ModelRecord(name, path, model_hash(path), args.dtype, device.type,
                        lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir)
    registry = ModelRegistry(load(path), model, dirs=dirs, load=load)
    app = create_app(registry.pipe, model, settings, registry=registry,
                     controlnets=ControlNetRegistry(controlnet_dirs))
    where = f"port {args.port}" if args.port else "a free port (uvicorn's line below names it)"
    print(f"serving {model.name} on {args.host}, {where} ({len(registry.entries)} models to switch between); "
          "the API's docs are at /docs", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _settings(args, limits, settings_class):
    """The server settings of the flags, checked: a bind beyond localhost needs an API key."""
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be >= 1, got {args.queue_size}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.keep_jobs < 1 or not args.keep_minutes > 0:
        raise UserError(f"--keep-jobs must be >= 1 and --keep-minutes > 0, got {args.keep_jobs} and "
                        f"{args.keep_minutes}")
    if args.host not in LOCAL_HOSTS and not args.api_key:
        raise UserError(f"--host {args.host} lets other machines reach the server: give --api-key KEY (or "
                        f"set ${API_KEY_ENV}) so that only those who know it can use it")
    wildcard = args.host in ("0.0.0.0", "::", "")
    allowed = frozenset((*LOCAL_HOSTS, *([] if wildcard else [args.host.lower()]),
                         *(name.lower() for name in args.allowed_host)))
    flags = {"host": args.host, "port": args.port, "models_dir": [Path(d).name for d in args.models_dir],
             "allowed_host": args.allowed_host, "api_key": bool(args.api_key), "queue_size": args.queue_size,
             "dtype": args.dtype, "device": args.device,
             **{name: getattr(args, name) for name in LIMIT_FLAGS}}
    return settings_class(limits=limits, queue_size=args.queue_size, keep_jobs=args.keep_jobs,
                          keep_minutes=args.keep_minutes, allowed_hosts=allowed, api_key=args.api_key or None,
                          flags=flags)
