"""Train a model: `train ddpm` (pixel-space DDPM; also what `train --dataset ...` means), or the three stages
of a latent text-to-image model, in order: `train vae`, `train text-encoder` (optional), `train unet`.

Under torchrun (`torchrun --nproc_per_node N -m nanodiffusion train ...`) every stage trains with
DistributedDataParallel: gloo on the CPU, nccl with --device cuda; the results equal one process's.
"""

import argparse
import importlib

from nanodiffusion.training import distributed

HELP = "train a model: ddpm (default), or vae, text-encoder and unet for text-to-image"
STAGES = {                  # stage -> module in nanodiffusion.commands with `add_arguments` and `run`
    "ddpm": "train_ddpm", "vae": "train_vae", "text-encoder": "train_text_encoder", "unet": "train_unet",
}
DEFAULT_STAGE = "ddpm"          # `nanodiffusion train --dataset ...` (no stage) trains DDPM, as it always did


def add_arguments(p) -> None:
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, module_name in STAGES.items():
        module = importlib.import_module(f"nanodiffusion.commands.{module_name}")
        stage = stages.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(stage)
        stage.set_defaults(run_stage=module.run)


def run(args) -> None:
    distributed.init_from_env(args.device)
    try:
        args.run_stage(args)
    finally:
        distributed.shutdown()
