"""Train a ControlNet for a text-to-image model (--model, frozen) on the Canny edges of a captioned data set's
images: `nanodiffusion train controlnet --model builtin --dataset shapes`. Writes the diffusers ControlNet
folder OUT_DIR/controlnet/, for `nanodiffusion generate --controlnet`.
"""

from nanodiffusion.commands.train_options import (
    add_data_arguments, add_loop_arguments, load_captioned_data, loop_settings, resume_if_asked, say,
)
from nanodiffusion.validation import finite_float
from nanodiffusion.training.controlnet_trainer import (
    CONTROLNET_FOLDER, ControlNetTrainConfig, ControlNetTrainer,
)

DEFAULT_EMBEDDING = (16, 32, 64)        # the control-image encoder for the built-in model (4x downscale)


def add_arguments(p) -> None:
    defaults = ControlNetTrainConfig()
    add_data_arguments(p, datasets="shapes, mnist, fashion-mnist, a mix a+b, or a folder", image_size=None)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="builtin",
                       help="the text-to-image model the ControlNet steers (frozen; default: builtin)")
    model.add_argument("--embedding-channels", type=int, nargs="+", default=list(DEFAULT_EMBEDDING),
                       help="widths of the control-image encoder; one more than the VAE's halvings")
    train = add_loop_arguments(p, defaults)        # the schedule and the prediction are the model's
    train.add_argument("--ema-decay", type=finite_float, default=defaults.ema_decay)
    train.add_argument("--min-snr-gamma", type=finite_float,
                       help="min-SNR loss weighting (e.g. 5); off by default")
    train.add_argument("--caption-dropout", type=finite_float, default=defaults.caption_dropout,
                       help="probability of training on the empty caption (the paper's 0.5)")
    train.add_argument("--low-threshold", type=finite_float, default=defaults.low_threshold,
                       help="Canny's low threshold for the control maps")
    train.add_argument("--high-threshold", type=finite_float, default=defaults.high_threshold,
                       help="Canny's high threshold for the control maps")


def run(args) -> None:
    from nanodiffusion.pipelines.text_to_image import TextToImage
    from nanodiffusion.weights.models import model_hash, model_path
    path = model_path(args.model)
    pipe = TextToImage.from_pretrained(path)
    pipe.show_progress = False
    if args.image_size is None:
        args.image_size = pipe.native_size
    dataset = load_captioned_data(args)
    config = ControlNetTrainConfig(**loop_settings(args), ema_decay=args.ema_decay,
                                   min_snr_gamma=args.min_snr_gamma, prediction=pipe.schedule.prediction,
                                   caption_dropout=args.caption_dropout, low_threshold=args.low_threshold,
                                   high_threshold=args.high_threshold)
    trainer = ControlNetTrainer(config, pipe, dataset, embedding_channels=tuple(args.embedding_channels),
                                base_hash=model_hash(path))
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.controlnet.parameters())
    say(f"training a {params / 1e6:.2f}M-parameter ControlNet for {args.model} on the edges of "
        f"{len(dataset)} images; checkpoints in {args.out_dir}")
    state = trainer.fit()
    say(f"done: {state.step} steps; ControlNet: {args.out_dir}/{CONTROLNET_FOLDER}")
