"""Train the autoencoder of a latent text-to-image model by maximising the ELBO: squared error under a
Gaussian decoder with std --recon-std, plus --kl-weight times the KL to N(0, I). At the end the latent scaling
factor (1 / std of the latents) is measured on the data and the VAE is written to OUT_DIR/vae/, for
`train unet --vae`.
"""

import dataclasses

from nanodiffusion.commands.train_options import (
    add_data_arguments, add_loop_arguments, load_captioned_data, loop_settings, resume_if_asked, say,
)
from nanodiffusion.training.vae_trainer import SMALL_VAE, VAETrainConfig, VAETrainer
from nanodiffusion.validation import finite_float


def add_arguments(p) -> None:
    add_data_arguments(p, datasets="mnist, fashion-mnist, shapes, a mix a+b, or a folder", image_size=32)
    model = p.add_argument_group("model")
    model.add_argument("--block-channels", type=int, nargs="+", default=list(SMALL_VAE.block_channels),
                       help="encoder widths per level; each level after the first halves the side")
    model.add_argument("--layers-per-block", type=int, default=SMALL_VAE.layers_per_block)
    model.add_argument("--latent-channels", type=int, default=SMALL_VAE.latent_channels)
    model.add_argument("--norm-groups", type=int, default=SMALL_VAE.norm_groups)
    defaults = VAETrainConfig()
    train = add_loop_arguments(p, defaults)
    train.add_argument("--recon-std", type=finite_float, default=defaults.recon_std,
                       help="std σ of the Gaussian decoder in [-1, 1] pixel units (squared error / 2σ²)")
    train.add_argument("--kl-weight", type=finite_float, default=defaults.kl_weight,
                       help="β on the KL term (1: the ELBO)")
    train.add_argument("--scale-images", type=int, default=defaults.scale_images,
                       help="images encoded to measure the latent scaling factor")


def run(args) -> None:
    dataset = load_captioned_data(args)
    config = VAETrainConfig(**loop_settings(args), recon_std=args.recon_std, kl_weight=args.kl_weight,
                            scale_images=args.scale_images)
    vae_config = dataclasses.replace(
        SMALL_VAE, in_channels=dataset.channels, out_channels=dataset.channels,
        block_channels=tuple(args.block_channels), layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels, norm_groups=args.norm_groups, sample_size=dataset.image_size)
    trainer = VAETrainer(config, vae_config, dataset)
    if resume_if_asked(trainer, args):
        return
    params = sum(p.numel() for p in trainer.vae.parameters())
    say(f"training a {params / 1e6:.2f}M-parameter VAE on {len(dataset)} images; "
        f"checkpoints in {args.out_dir}")
    state = trainer.fit()
    say(f"done: {state.step} steps; VAE: {args.out_dir}/vae")
