"""Train a pixel-space DDPM model from scratch (MNIST, Fashion-MNIST or a folder of images)."""

import dataclasses
from pathlib import Path

from nanodiffusion.data.datasets import load_dataset
from nanodiffusion.diffusion.forward import PREDICTION_TYPES
from nanodiffusion.diffusion.schedules import SCHEDULE_DEFAULTS, ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import UNET_PRESETS
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig

HELP = "train a DDPM model from scratch"


def add_arguments(p) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist", help="mnist, fashion-mnist or a folder of images")
    data.add_argument("--data-dir", help="folder holding the dataset files (else $NANODIFFUSION_DATA, the cache)")
    data.add_argument("--image-size", type=int, help="train at this size (default: the dataset's / preset's)")
    data.add_argument("--channels", type=int, choices=(1, 3), help="1 (grayscale) or 3 (RGB)")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="default", choices=list(UNET_PRESETS), help="UNet preset")
    model.add_argument("--model-channels", type=int, help="override the preset's base width")
    model.add_argument("--channel-mult", type=int, nargs="+", help="override the preset's width multipliers")
    model.add_argument("--num-res-blocks", type=int, help="override the preset's ResBlocks per level")
    model.add_argument("--attention-levels", type=int, nargs="*", help="override the levels with self-attention")
    model.add_argument("--norm-groups", type=int, help="override the preset's GroupNorm groups")
    model.add_argument("--dropout", type=float, help="override the preset's dropout")
    model.add_argument("--unconditional", action="store_true", help="ignore class labels")
    model.add_argument("--schedule", default="linear", choices=list(SCHEDULE_DEFAULTS), help="noise schedule")
    model.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    model.add_argument("--prediction", default="epsilon", choices=PREDICTION_TYPES, help="what the UNet predicts")
    train = p.add_argument_group("training")
    defaults = TrainConfig()
    train.add_argument("--out-dir", default=defaults.out_dir, help="where checkpoints and samples go")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    train.add_argument("--lr-schedule", default=defaults.lr_schedule, choices=("constant", "cosine"),
                       help="learning rate after warm-up: constant, or cosine decay to 10 %% at the end")
    train.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    train.add_argument("--label-dropout", type=float, default=defaults.label_dropout,
                       help="probability of dropping the label (null class), for classifier-free guidance")
    train.add_argument("--min-snr-gamma", type=float, help="min-SNR loss weighting (e.g. 5); off by default")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on AVX-512-BF16/AMX CPUs)")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last memory format (faster convs, but slower GroupNorm on CPU)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--save-every", type=int, default=0, help="also save `last` every N steps")
    train.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N epochs")
    train.add_argument("--resume", nargs="?", const="auto",
                       help="resume from a checkpoint (default: OUT_DIR/last.safetensors)")


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
    dataset = load_dataset(args.dataset, image_size=args.image_size or default_size, channels=args.channels,
                           data_dir=args.data_dir)
    config = TrainConfig(out_dir=args.out_dir, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         lr_schedule=args.lr_schedule,
                         ema_decay=args.ema_decay, prediction=args.prediction, min_snr_gamma=args.min_snr_gamma,
                         label_dropout=args.label_dropout, bf16=args.bf16, channels_last=args.channels_last,
                         seed=args.seed,
                         save_every_steps=args.save_every, sample_every_epochs=args.sample_every)
    trainer = DDPMTrainer(config, unet_config_for(args, dataset), ScheduleConfig(args.schedule, args.timesteps),
                          dataset)
    if args.resume:
        path = Path(args.out_dir) / "last.safetensors" if args.resume == "auto" else Path(args.resume)
        if not path.is_file():
            raise UserError(f"nothing to resume: {path} does not exist")
        trainer.resume(path)
        print(f"resumed from {path} at epoch {trainer.state.epoch}, step {trainer.state.step}")
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"training {params / 1e6:.2f}M parameters on {len(dataset)} images; checkpoints in {args.out_dir}")
    state = trainer.fit()
    best = Path(args.out_dir) / "best.safetensors"
    if best.is_file():
        print(f"done: {state.step} steps; best epoch loss {state.best_loss:.4f}; model: {best}")
    else:                                   # stopped by --max-steps before the first epoch ended
        print(f"done: {state.step} steps; model: {Path(args.out_dir) / 'last.safetensors'}")
