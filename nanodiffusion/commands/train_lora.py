"""Train a LoRA on a text-to-image model (a diffusers folder, single file, repo id or the built-in model) from a
captioned image folder (metadata.jsonl, or a .txt caption beside each image), as kohya's sd-scripts do: the
model stays frozen, the LoRA learns. Writes OUT_DIR/NAME.safetensors, a kohya/A1111 LoRA file for
`generate --lora`, `<lora:NAME:1>` in a --lora-dir, A1111 and diffusers' load_lora_weights.
"""

from pathlib import Path

from nanodiffusion.commands.train_options import add_loop_arguments, loop_settings, resume_if_asked, say
from nanodiffusion.errors import UserError
from nanodiffusion.training.lora_trainer import LoRATrainConfig, LoRATrainer
from nanodiffusion.validation import finite_float
from nanodiffusion.weights.models import DEFAULT_TEXT_TO_IMAGE, model_hash, model_path


def add_arguments(p) -> None:
    defaults = LoRATrainConfig()
    data = p.add_argument_group("model and data")
    data.add_argument("--model", default=DEFAULT_TEXT_TO_IMAGE,
                      help=f"the model to adapt: diffusers folder, .safetensors file or Hugging Face repo id "
                           f"(default: {DEFAULT_TEXT_TO_IMAGE})")
    data.add_argument("--dataset", required=True,
                      help="a captioned image folder (metadata.jsonl, or NAME.txt beside each image), or "
                           "one of train unet's data sets (shapes, mnist, ...)")
    data.add_argument("--image-size", type=int, help="train at this size (default: the model's native size)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--name", help="the LoRA's name: OUT_DIR/NAME.safetensors (default: OUT_DIR's name)")
    lora.add_argument("--rank", type=int, default=defaults.rank, help="rank r of each LoRA layer")
    lora.add_argument("--alpha", type=finite_float,
                      help="alpha: the LoRA is scaled by alpha / rank (default: the rank, a scale of 1)")
    lora.add_argument("--text-encoder-lora", action="store_true",
                      help="also train a LoRA on the text encoder (it learns new words better)")
    train = add_loop_arguments(p, defaults)
    train.add_argument("--caption-dropout", type=finite_float, default=defaults.caption_dropout,
                       help="probability of training on the empty caption")
    train.add_argument("--ema", action="store_true", help="save the exponential moving average of the LoRA")
    train.add_argument("--ema-decay", type=finite_float, default=defaults.ema_decay)
    train.add_argument("--min-snr-gamma", type=finite_float,
                       help="min-SNR loss weighting (e.g. 5); off by default")
    train.add_argument("--sample-prompt", action="append", default=[],
                       help="a prompt of the sample grids (repeat; default: the first captions)")
    train.add_argument("--sample-guidance", type=finite_float,
                       help="guidance of the sample grids (the model's)")


def run(args) -> None:
    from nanodiffusion.data.captioned import load_captioned
    from nanodiffusion.pipelines.text_to_image import TextToImage

    path = model_path(args.model)
    pipe = TextToImage.from_pretrained(path)
    pipe.show_progress = False
    size = args.image_size if args.image_size is not None else pipe.native_size
    dataset = load_captioned(args.dataset, image_size=size, channels=pipe.vae.config.in_channels,
                             seed=args.seed)
    if dataset.image_size != size:
        raise UserError(f"--dataset {args.dataset} holds {dataset.image_size}-pixel images, not {size}")
    config = LoRATrainConfig(
        **loop_settings(args), ema_decay=args.ema_decay, prediction=pipe.schedule.prediction,
        min_snr_gamma=args.min_snr_gamma, name=args.name or Path(args.out_dir).name, rank=args.rank,
        alpha=args.alpha, train_text_encoder=args.text_encoder_lora, use_ema=args.ema,
        caption_dropout=args.caption_dropout, sample_prompts=tuple(args.sample_prompt),
        sample_guidance_scale=args.sample_guidance)
    trainer = LoRATrainer(config, pipe, dataset, (path.stem if path.is_file() else path.name, model_hash(path)))
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.lora.parameters())
    say(f"training a rank-{config.rank} LoRA ({params / 1e3:.1f}k parameters on "
        f"{', '.join(trainer.lora.targets)}) on {len(dataset)} captioned images; checkpoints in "
        f"{args.out_dir}")
    state = trainer.fit()
    say(f"done: {state.step} steps; LoRA: {trainer.lora_path} (generate --lora {trainer.lora_path})")
