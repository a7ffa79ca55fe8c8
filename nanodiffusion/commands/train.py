"""Train a model: `train ddpm` (pixel-space DDPM; also what `train --dataset ...` means), or the three stages
of a latent text-to-image model, in order: `train vae`, `train text-encoder` (optional), `train unet`.

Under torchrun (`torchrun --nproc_per_node N -m nanodiffusion train ...`) every stage trains with
DistributedDataParallel: gloo on the CPU, nccl with --device cuda; the results equal one process's.
"""

from nanodiffusion.commands import add_commands
from nanodiffusion.training import distributed
from nanodiffusion.validation import resolve_device

STAGES = {                  # stage -> (module in nanodiffusion.commands with `add_arguments` and `run`, help)
    "ddpm": ("train_ddpm", "a pixel-space DDPM model, from scratch"),
    "vae": ("train_vae", "stage 1 of text-to-image: the VAE (AutoencoderKL)"),
    "text-encoder": ("train_text_encoder",
                     "stage 2 of text-to-image (optional): pre-train the text encoder as a miniature CLIP"),
    "unet": ("train_unet", "stage 3 of text-to-image: the latent UNet with cross-attention"),
    "controlnet": ("train_controlnet", "a ControlNet for a text-to-image model, on edge maps"),
    "lora": ("train_lora", "a LoRA on a text-to-image model, from a captioned image folder"),
}


def add_arguments(p) -> None:
    add_commands(p, STAGES, dest="stage", run_key="run_stage")


def run(args) -> None:
    resolve_device(args.device)                 # a device this machine lacks fails before any work
    distributed.init_from_env(args.device)
    try:
        args.run_stage(args)
    finally:
        distributed.shutdown()
