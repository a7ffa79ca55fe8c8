"""Serve a Stable Diffusion v1.x model over HTTP: a web page (prompt, settings, progress bar, gallery) and
AUTOMATIC1111's API (POST /sdapi/v1/txt2img, GET /sdapi/v1/progress, ...), so A1111 clients work unchanged.

Generations run one at a time from a bounded queue; when it is full the server answers 429. It binds to
127.0.0.1 by default: it has no authentication, so think twice before --host 0.0.0.0.
"""

import torch

from nanodiffusion.errors import UserError
from nanodiffusion.pipelines.metadata import ModelRecord
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.weights.components import DTYPES
from nanodiffusion.weights.models import DEFAULT_TEXT_TO_IMAGE, model_hash, model_path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_TEXT_TO_IMAGE,
                   help="diffusers folder, .safetensors/.ckpt file or Hugging Face repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0: every interface")
    p.add_argument("--port", type=int, default=7860, help="port (A1111's default); 0: a free one")
    p.add_argument("--queue-size", type=int, default=8,
                   help="jobs that may wait besides the running one; more get HTTP 429")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights dtype")
    p.add_argument("--device", default=None, help="device; None: cuda if available, else cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")


def run(args) -> None:
    try:
        import uvicorn

        from nanodiffusion.server.app import create_app
    except ImportError as error:
        raise UserError(f"the server needs FastAPI and uvicorn ({error}): "
                        "pip install 'nanodiffusion[serve]'") from None
    if args.queue_size < 1:
        raise UserError(f"--queue-size must be >= 1, got {args.queue_size}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = model_path(args.model)
    pipe = TextToImage.from_pretrained(path, dtype=DTYPES[args.dtype], device=device)
    pipe.show_progress = False
    model = ModelRecord(args.model, path, model_hash(path), args.dtype, torch.device(device).type)
    app = create_app(pipe, model, queue_size=args.queue_size)
    if args.host not in LOCAL_HOSTS:
        print(f"warning: listening on {args.host}: anyone who can reach it can use the server "
              "(there is no authentication)")
    where = f"port {args.port}" if args.port else "a free port (uvicorn's line below names it)"
    print(f"serving {model.name} on {args.host}, {where}; the API's docs are at /docs", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
