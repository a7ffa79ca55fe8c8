"""Train the text-conditioned UNet of a latent text-to-image model on the latents of a VAE from `train vae`.
The text encoder is either pre-trained by `train text-encoder` and frozen (--text-encoder DIR), or new and
trained jointly with the UNet (no --text-encoder; its tokenizer is trained on the captions), or pre-trained
and fine-tuned (--text-encoder DIR --train-text-encoder). Writes the diffusers folder OUT_DIR/pipeline/, for
`nanodiffusion generate --model` and diffusers' StableDiffusionPipeline.
"""

import dataclasses

from nanodiffusion.commands.train_options import (
    add_data_arguments, add_denoising_arguments, add_text_arguments, denoising_settings,
    load_captioned_data, resume_if_asked, say, schedule_for, text_base_config,
)
from nanodiffusion.training.captions import caption_tokenizer, new_text_encoder
from nanodiffusion.training.export import load_component, load_tokenizer
from nanodiffusion.training.latent_trainer import (
    PIPELINE_FOLDER, SMALL_UNET, LatentTrainConfig, LatentTrainer,
)
from nanodiffusion.validation import finite_float
from nanodiffusion.weights.models import BUILTIN_TEXT_TO_IMAGE


def add_arguments(p) -> None:
    defaults = LatentTrainConfig()
    add_data_arguments(p, datasets="mnist, fashion-mnist, shapes, a mix a+b, or a folder", image_size=32)
    parts = p.add_argument_group("components")
    parts.add_argument("--vae", required=True,
                       help="the VAE: `train vae`'s OUT_DIR, its vae/ folder, or a diffusers folder")
    parts.add_argument("--text-encoder",
                       help="a pre-trained text encoder and tokenizer (`train text-encoder`'s OUT_DIR or a "
                       "diffusers folder), frozen; without it a new one is trained with the UNet")
    parts.add_argument("--train-text-encoder", action="store_true",
                       help="also train the --text-encoder given (with the UNet's optimizer and EMA)")
    parts.add_argument("--init-unet",
                       help="fine-tune: start from this UNet (a diffusers folder, its unet/ folder, or "
                       "`builtin`); its config then replaces the model options below")
    add_text_arguments(p)
    model = p.add_argument_group("model")
    model.add_argument("--model-channels", type=int, default=SMALL_UNET.model_channels)
    model.add_argument("--channel-mult", type=int, nargs="+", default=list(SMALL_UNET.channel_mult))
    model.add_argument("--attention-levels", type=int, nargs="*", default=list(SMALL_UNET.attention_levels),
                       help="levels with cross-attention transformers (the middle always has one)")
    model.add_argument("--num-heads", type=int, default=SMALL_UNET.num_heads)
    model.add_argument("--num-res-blocks", type=int, default=SMALL_UNET.num_res_blocks)
    train = add_denoising_arguments(p, model, defaults, schedule="scaled_linear")
    train.add_argument("--caption-dropout", type=finite_float, default=defaults.caption_dropout,
                       help="probability of training on the empty caption, for classifier-free guidance")
    train.add_argument("--sample-posterior", action="store_true",
                       help="train on a fresh z ~ q(z|x) at each visit instead of the posterior mean")
    train.add_argument("--sample-prompt", action="append", default=[],
                       help="a prompt of the sample grids (repeat; default: the first captions)")
    train.add_argument("--sample-guidance", type=finite_float, default=defaults.sample_guidance_scale,
                       help="guidance scale of the sample grids")


def run(args) -> None:
    vae = load_component(args.vae, "vae")                  # the components first: they fail fast
    if args.text_encoder:
        text_encoder = load_component(args.text_encoder, "text_encoder")
        tokenizer = load_tokenizer(args.text_encoder)
    dataset = load_captioned_data(args)
    if not args.text_encoder:
        tokenizer = caption_tokenizer(dataset, args.vocab_size, args.max_tokens)
        text_encoder = new_text_encoder(tokenizer, text_base_config(args), seed=args.seed)
    config = LatentTrainConfig(
        **denoising_settings(args), caption_dropout=args.caption_dropout,
        train_text_encoder=args.train_text_encoder or not args.text_encoder,
        sample_posterior=args.sample_posterior, sample_prompts=tuple(args.sample_prompt),
        sample_guidance_scale=args.sample_guidance)
    latent_side = dataset.image_size // vae.config.downsample_factor
    unet_config = dataclasses.replace(
        SMALL_UNET, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        model_channels=args.model_channels, channel_mult=tuple(args.channel_mult),
        attention_levels=tuple(args.attention_levels), num_heads=args.num_heads,
        num_res_blocks=args.num_res_blocks, context_dim=text_encoder.config.hidden_size,
        sample_size=latent_side)
    if args.init_unet:
        init = load_component(BUILTIN_TEXT_TO_IMAGE.get(args.init_unet, args.init_unet), "unet")
        unet_config = init.config
    trainer = LatentTrainer(config, unet_config, schedule_for(args), dataset, vae, text_encoder, tokenizer)
    if args.init_unet:
        trainer.init_unet(init)
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.unet.parameters())
    text = "trained with it" if config.train_text_encoder else "frozen"
    say(f"training a {params / 1e6:.2f}M-parameter UNet (text encoder {text}) on {len(dataset)} captioned "
        f"images; checkpoints in {args.out_dir}")
    state = trainer.fit()
    say(f"done: {state.step} steps; text-to-image model: {args.out_dir}/{PIPELINE_FOLDER}")
