"""Command-line options that every training stage shares, and the steps around a trainer: resuming and
printing (rank 0 only under torchrun)."""

import dataclasses
from pathlib import Path

from nanodiffusion.diffusion.forward import PREDICTION_TYPES
from nanodiffusion.diffusion.schedules import SCHEDULE_DEFAULTS, ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.clip_text import CLIPTextConfig
from nanodiffusion.training import distributed
from nanodiffusion.training.captions import SMALL_TEXT
from nanodiffusion.training.denoising import DenoisingConfig
from nanodiffusion.training.run_state import LR_SCHEDULES, LoopConfig
from nanodiffusion.validation import finite_float


def add_data_arguments(p, *, datasets: str, image_size: int | None) -> None:
    """--dataset (`datasets` says which), --data-dir, --image-size (default `image_size`), --channels."""
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="fashion-mnist" if image_size is None else "mnist", help=datasets)
    data.add_argument("--data-dir",
                      help="folder holding the dataset files (else $NANODIFFUSION_DATA, the cache)")
    size_help = "train at this size" + (" (default: the dataset's / preset's)" if image_size is None else "")
    data.add_argument("--image-size", type=int, default=image_size, help=size_help)
    data.add_argument("--channels", type=int, choices=(1, 3), help="1 (grayscale) or 3 (RGB)")
    data.add_argument("--num-shapes", type=int, default=60_000, help="coloured-shapes scenes (with shapes)")
    data.add_argument("--two-object-prob", type=finite_float, default=0.3,
                      help="fraction of the shapes scenes with two objects and a relation")
    data.add_argument("--num-class-images", type=int,
                      help="the first N training images of each of mnist/fashion-mnist (default: all)")


def add_loop_arguments(p, defaults: LoopConfig):
    """The shared training options (a group named "training", returned for the stage's own options)."""
    train = p.add_argument_group("training")
    train.add_argument("--out-dir", default=defaults.out_dir,
                       help="where checkpoints, samples and the model go")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="global batch size (split over the processes under torchrun)")
    train.add_argument("--lr", type=finite_float, default=defaults.lr, help="AdamW learning rate")
    train.add_argument("--weight-decay", type=finite_float, default=defaults.weight_decay,
                       help="AdamW weight decay")
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                       help="linear learning-rate warm-up steps")
    train.add_argument("--lr-schedule", default=defaults.lr_schedule, choices=LR_SCHEDULES,
                       help="learning rate after warm-up: constant, or cosine decay to 10 %% at the end")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on AVX-512-BF16/AMX CPUs)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=defaults.device,
                       help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    train.add_argument("--save-every", type=int, default=0, help="also save `last` every N steps")
    train.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N epochs")
    train.add_argument("--resume", nargs="?", const="auto",
                       help="resume from a checkpoint (default: OUT_DIR/last.safetensors)")
    return train


def loop_settings(args) -> dict:
    """The LoopConfig fields from the shared options (a stage adds its own to build its config)."""
    return dict(out_dir=args.out_dir, epochs=args.epochs, max_steps=args.max_steps,
                batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, bf16=args.bf16, seed=args.seed,
                save_every_steps=args.save_every, sample_every_epochs=args.sample_every, device=args.device)


def add_denoising_arguments(p, model, defaults: DenoisingConfig, schedule: str):
    """The noise schedule and the UNet's target (to the `model` group), the shared training options with the
    EMA and the loss weighting (a "training" group, returned for the stage's own options)."""
    train = add_loop_arguments(p, defaults)
    model.add_argument("--schedule", default=schedule, choices=list(SCHEDULE_DEFAULTS), help="noise schedule")
    model.add_argument("--timesteps", type=int, default=1000, help="number of diffusion steps T")
    model.add_argument("--prediction", default=defaults.prediction, choices=PREDICTION_TYPES,
                       help="what the UNet predicts")
    train.add_argument("--ema-decay", type=finite_float, default=defaults.ema_decay)
    train.add_argument("--min-snr-gamma", type=finite_float,
                       help="min-SNR loss weighting (e.g. 5); off by default")
    return train


def denoising_settings(args) -> dict:
    """The DenoisingConfig fields from the shared options: loop_settings and the denoising ones."""
    return dict(loop_settings(args), ema_decay=args.ema_decay, prediction=args.prediction,
                min_snr_gamma=args.min_snr_gamma)


def schedule_for(args) -> ScheduleConfig:
    """The noise schedule of --schedule and --timesteps."""
    return ScheduleConfig(args.schedule, args.timesteps)


def add_text_arguments(p) -> None:
    """Size of a new text encoder and its tokenizer (trained on the data set's captions)."""
    text = p.add_argument_group("new text encoder")
    text.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (at most)")
    text.add_argument("--max-tokens", type=int, default=77,
                      help="text context: ids per prompt with start and end (CLIP's 77; short captions train "
                      "faster with fewer)")
    text.add_argument("--text-width", type=int, default=SMALL_TEXT.hidden_size, help="hidden size")
    text.add_argument("--text-layers", type=int, default=SMALL_TEXT.num_layers, help="transformer layers")
    text.add_argument("--text-heads", type=int, default=SMALL_TEXT.num_heads, help="attention heads")


def text_base_config(args) -> CLIPTextConfig:
    """SMALL_TEXT with the command line's sizes (the MLP is 4x as wide, as in CLIP)."""
    return dataclasses.replace(SMALL_TEXT, hidden_size=args.text_width, num_layers=args.text_layers,
                               num_heads=args.text_heads, intermediate_size=4 * args.text_width)


def load_captioned_data(args):
    """The captioned data set named by --dataset, at --image-size and --channels."""
    from nanodiffusion.data.captioned import load_captioned
    return load_captioned(args.dataset, image_size=args.image_size, channels=args.channels,
                          data_dir=args.data_dir, seed=args.seed, num_shapes=args.num_shapes,
                          two_object_prob=args.two_object_prob, num_class_images=args.num_class_images)


def say(message: str) -> None:
    """Print on rank 0 only."""
    if distributed.is_main_process():
        print(message)


def resume_if_asked(trainer, args) -> bool:
    """Resume `trainer` from --resume (OUT_DIR/last.safetensors when given without a path); True when that
    run is already finished (said, and then nothing is to be changed)."""
    if not args.resume:
        return False
    path = Path(args.out_dir) / "last.safetensors" if args.resume == "auto" else Path(args.resume)
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist")
    trainer.resume(path)
    state, limit = trainer.state, (f"--max-steps {args.max_steps}" if args.max_steps else
                                   f"--epochs {args.epochs}")
    if trainer.run.finished:
        say(f"{path} is a finished run (epoch {state.epoch}, step {state.step}; {limit}): nothing to do, "
            "nothing changed; raise --epochs or --max-steps to train further")
        return True
    say(f"resumed from {path} at epoch {state.epoch}, step {state.step}")
    return False
