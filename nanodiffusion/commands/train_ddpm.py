"""Train a pixel-space DDPM model from scratch (MNIST, Fashion-MNIST or a folder of images)."""

import dataclasses
from pathlib import Path

from nanodiffusion.commands.train_options import (
    add_data_arguments, add_denoising_arguments, denoising_settings, resume_if_asked, say,
    schedule_for,
)
from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.nets.ddpm_unet import UNET_PRESETS
from nanodiffusion.pipelines.memory import ddpm_training_bytes
from nanodiffusion.training import distributed
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig
from nanodiffusion.validation import check_fits, finite_float


def add_arguments(p) -> None:
    defaults = TrainConfig()
    add_data_arguments(p, datasets="mnist, fashion-mnist or a folder of images", image_size=None)
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="default", choices=list(UNET_PRESETS), help="UNet preset")
    model.add_argument("--model-channels", type=int, help="override the preset's base width")
    model.add_argument("--channel-mult", type=int, nargs="+", help="override the preset's width multipliers")
    model.add_argument("--num-res-blocks", type=int, help="override the preset's ResBlocks per level")
    model.add_argument("--attention-levels", type=int, nargs="*", help="override the levels with self-attention")
    model.add_argument("--norm-groups", type=int, help="override the preset's GroupNorm groups")
    model.add_argument("--dropout", type=finite_float, help="override the preset's dropout")
    model.add_argument("--unconditional", action="store_true", help="ignore class labels")
    train = add_denoising_arguments(p, model, defaults, schedule="linear")
    train.add_argument("--label-dropout", type=finite_float, default=defaults.label_dropout,
                       help="probability of dropping the label (null class), for classifier-free guidance")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format (faster convs, but slower GroupNorm on CPU)")


def unet_config_for(args, dataset):
    """The preset with the dataset's channels, size and classes, and the command line's overrides."""
    preset = UNET_PRESETS[args.preset]
    changes = {"in_channels": dataset.channels, "out_channels": dataset.channels,
               "image_size": dataset.image_size}
    if preset.arch == "resnet":
        changes["num_classes"] = None if args.unconditional or not dataset.num_classes else dataset.num_classes
    overrides = {"model_channels": args.model_channels, "num_res_blocks": args.num_res_blocks,
                 "norm_groups": args.norm_groups, "dropout": args.dropout,
                 "channel_mult": tuple(args.channel_mult) if args.channel_mult else None,
                 "attention_levels": tuple(args.attention_levels) if args.attention_levels is not None else None}
    changes |= {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(preset, **changes)


def run(args) -> None:
    default_size = UNET_PRESETS[args.preset].image_size if not args.dataset.endswith("mnist") else None
    size = args.image_size if args.image_size is not None else default_size
    dataset = load_dataset(args.dataset, image_size=size, channels=args.channels,
                           data_dir=args.data_dir)
    config = TrainConfig(**denoising_settings(args), label_dropout=args.label_dropout,
                         channels_last=args.channels_last)
    unet_config = unet_config_for(args, dataset)
    batch = -(-config.batch_size // distributed.world()[1])                # per process
    check_fits(ddpm_training_bytes(unet_config, batch), distributed.process_device(config.device),
               f"training on batches of {batch} images of {unet_config.image_size}x{unet_config.image_size}",
               "lower --batch-size or --image-size")
    trainer = DDPMTrainer(config, unet_config, schedule_for(args), dataset)
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.model.parameters())
    say(f"training {params / 1e6:.2f}M parameters on {len(dataset)} images; checkpoints in {args.out_dir}")
    state = trainer.fit()
    best = Path(args.out_dir) / "best.safetensors"
    if best.is_file():
        say(f"done: {state.step} steps; best epoch loss {state.best_loss:.4f}; model: {best}")
    else:                                   # stopped by --max-steps before the first epoch ended
        say(f"done: {state.step} steps; model: {Path(args.out_dir) / 'last.safetensors'}")
