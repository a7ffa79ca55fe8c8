"""Resolve a Hugging Face repo id ("owner/name") to a local diffusers folder with huggingface_hub."""

import re
from pathlib import Path

from nanodiffusion.errors import UserError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def looks_like_repo_id(text: str) -> bool:
    """True for "owner/name" (one slash, no file suffix): what is not a local path is tried on the Hub."""
    return bool(_REPO_ID.match(text)) and not text.endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth"))


def _patterns(variant: str | None) -> list[str]:
    """Only what load_diffusers reads: configs, tokenizer files and one weight file per network."""
    suffix = f".{variant}" if variant else ""
    return ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*",
            f"unet/diffusion_pytorch_model{suffix}.safetensors",
            f"vae/diffusion_pytorch_model{suffix}.safetensors", f"text_encoder/model{suffix}.safetensors"]


def download_repo(repo_id: str, *, variant: str | None = None) -> Path:
    """Local folder of `repo_id` from the Hugging Face cache, downloading what is missing when online."""
    manual = (f"download it yourself, e.g. `huggingface-cli download {repo_id} --local-dir FOLDER` or "
              f"`git lfs install && git clone https://huggingface.co/{repo_id} FOLDER` on a machine with "
              "internet access, then pass FOLDER")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{repo_id!r} is neither a local file nor a folder, and huggingface_hub is not "
                        f"installed to fetch it from the Hub (pip install huggingface_hub); or "
                        f"{manual}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_patterns(variant)))
    except Exception as error:     # offline, unknown or gated repo, HTTP errors: all end the same way for us
        raise UserError(f"could not get {repo_id!r} from the Hugging Face Hub ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); {manual}") from None
