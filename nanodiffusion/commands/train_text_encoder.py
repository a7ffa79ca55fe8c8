"""Pre-train a text encoder for a latent text-to-image model contrastively: a BPE tokenizer is trained on the
captions, then a miniature CLIP (small conv image encoder + CLIP text transformer, symmetric InfoNCE with a
learned temperature). Writes OUT_DIR/text_encoder/ and OUT_DIR/tokenizer/ (for `train unet --text-encoder`,
which freezes it) and OUT_DIR/clip.safetensors (the CLIP-score evaluator, evaluation.clip_score.CLIPScorer).
"""

from nanodiffusion.commands.train_options import (
    add_data_arguments, add_loop_arguments, add_text_arguments, load_captioned_data, loop_settings,
    resume_if_asked, say, text_base_config,
)
from nanodiffusion.nets.mini_clip import MiniCLIPConfig
from nanodiffusion.training.captions import caption_tokenizer, text_config_for
from nanodiffusion.training.clip_trainer import TextEncoderTrainConfig, TextEncoderTrainer


def add_arguments(p) -> None:
    add_data_arguments(p, datasets="mnist, fashion-mnist, shapes, a mix a+b, or a folder", image_size=32)
    add_text_arguments(p)
    defaults = MiniCLIPConfig()
    image = p.add_argument_group("image encoder")
    image.add_argument("--image-widths", type=int, nargs="+", default=list(defaults.image_widths),
                       help="conv widths; each step to the next halves the side")
    image.add_argument("--embed-dim", type=int, default=defaults.embed_dim, help="joint embedding width")
    train = add_loop_arguments(p, TextEncoderTrainConfig())
    train.add_argument("--hard-negatives", action="store_true",
                       help="also contrast each shapes caption with edits of it: objects or relation swapped")


def run(args) -> None:
    dataset = load_captioned_data(args)
    tokenizer = caption_tokenizer(dataset, args.vocab_size, args.max_tokens)
    clip_config = MiniCLIPConfig(image_channels=dataset.channels, image_size=dataset.image_size,
                                 image_widths=tuple(args.image_widths), embed_dim=args.embed_dim)
    config = TextEncoderTrainConfig(**loop_settings(args), hard_negatives=args.hard_negatives)
    trainer = TextEncoderTrainer(config, clip_config,
                                 text_config_for(tokenizer, text_base_config(args)), dataset, tokenizer)
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.model.text_encoder.parameters())
    say(f"training a {params / 1e6:.2f}M-parameter text encoder ({tokenizer.vocab_size} tokens) with its "
        f"image encoder on {len(dataset)} captioned images; checkpoints in {args.out_dir}")
    state = trainer.fit()
    say(f"done: {state.step} steps; text encoder and tokenizer: {args.out_dir}")
