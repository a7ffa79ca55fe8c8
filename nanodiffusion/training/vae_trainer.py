"""Training the autoencoder of a latent diffusion model (Rombach et al. 2022, §3.1) by maximising the ELBO.

The decoder is a Gaussian p(x | z) = N(x̂(z), σ²I) with a fixed, stated σ (`recon_std`), so the reconstruction
term of the negative ELBO is the squared error / 2σ²; the prior is N(0, I) and the KL term is weighted by β
(`kl_weight`; β = 1 is the ELBO itself, Kingma & Welling 2014, eq. 3; β ≠ 1 is Higgins et al. 2017's β-VAE).
SD adds perceptual and adversarial terms; on small images the likelihood alone is enough. At the end, the
latent scaling factor 1/std(z) is measured on the data and stored in the exported VAE config.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.errors import UserError
from nanodiffusion.images import image_grid, save_png, to_pil
from nanodiffusion.nets.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from nanodiffusion.training import distributed
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.export import save_component
from nanodiffusion.training.run_state import LoopConfig, RunState, TrainState
from nanodiffusion.validation import check_float

# A small VAE for 32x32 images: 4x smaller latents (8x8x4), 0.95M parameters.
SMALL_VAE = VAEConfig(block_channels=(32, 64, 64), layers_per_block=1, norm_groups=16, sample_size=32)
GRID_IMAGES = 8                 # originals over reconstructions in each sample grid


@dataclass(frozen=True)
class VAETrainConfig(LoopConfig):
    """A VAE training run (saved in every checkpoint); see LoopConfig for the shared settings."""

    out_dir: str = "runs/vae"
    recon_std: float = 0.1        # σ of the Gaussian decoder, in the [-1, 1] pixel units (13 grey levels)
    kl_weight: float = 1.0        # β on the KL term; 1 is the ELBO
    scale_images: int = 4096      # images encoded to measure the latent scaling factor

    def __post_init__(self):
        super().__post_init__()
        check_float("recon_std", self.recon_std, above=0)
        check_float("kl_weight", self.kl_weight, minimum=0)
        if self.scale_images < 1:
            raise UserError(f"scale_images must be >= 1, got {self.scale_images}")


def negative_elbo(x: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian,
                  recon_std: float, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image terms (B,) of the negative ELBO per data dimension D, without its constant:
    loss = ‖x − x̂‖² / (2σ²D) + β·KL(q(z|x) ‖ N(0, I)) / D; also `mse` (per pixel) and `kl` (nats per image).
    """
    dims = x[0].numel()
    mse = (reconstruction.float() - x.float()).pow(2).flatten(1).mean(dim=1)       # (B,)
    kl = posterior.kl().float()                                                    # (B,)
    return {"loss": mse / (2 * recon_std**2) + kl_weight * kl / dims, "mse": mse, "kl": kl}


class _Autoencode(nn.Module):
    """x -> (reconstruction, posterior moments) with the reparametrisation noise given: what DDP calls."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1)             # (B, 2C, h, w)
        return self.vae.decode(posterior.mean + posterior.std * noise), moments


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, dataset: CaptionedDataset, num_images: int, *,
                          batch_size: int = 256, seed: int = 0) -> float:
    """1 / std of latents z ~ q(z|x) over `num_images` random images (Rombach et al. 2022, §4.3.2 and
    LDM's `scale_by_std`): z · factor has unit variance. Images are the start of a permutation drawn from
    Generator(seed); each chunk's posterior noise is drawn after its images, from the same generator."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_images]
    device = next(vae.parameters()).device
    latents = []
    for chunk in order.split(batch_size):
        images, _ = dataset.batch(chunk, generator)
        posterior = vae.encode(images.to(device))
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents.append((posterior.mean + posterior.std * noise).float().cpu())
    return 1.0 / torch.cat(latents).std().item()


class VAETrainer(Checkpointed):
    """Trains an AutoencoderKL on the images of a captioned data set; `fit()` trains and exports
    `out_dir/vae/` with the measured scaling factor."""

    def __init__(self, config: VAETrainConfig, vae_config: VAEConfig, dataset: CaptionedDataset):
        self.config, self.dataset = config, dataset
        self.run = RunState(config, len(dataset))
        self.image_shape = tuple(dataset.images.shape[1:])                     # (C, H, W)
        _check_shapes(vae_config, self.image_shape)
        self.vae = AutoencoderKL(vae_config).to(self.run.device)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.run.register(self.optimizer, {"vae": self.vae}, {"kind": "vae", "vae": vae_config.to_dict()})
        self.net = distributed.parallel(_Autoencode(self.vae))
        self.out_dir = Path(config.out_dir)

    @property
    def state(self) -> TrainState:
        return self.run.state

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One step on the global batch at `indices`; returns the batch means of loss, mse and kl."""
        run, cfg = self.run, self.config
        images, _ = self.dataset.batch(indices, run.generator)
        B, f = len(images), self.vae.config.downsample_factor
        latent_shape = (B, self.vae.config.latent_channels, images.shape[2] // f, images.shape[3] // f)
        noise = torch.randn(latent_shape, generator=run.generator)
        mine = run.shard(B)
        x, noise = images[mine].to(run.device), noise[mine].to(run.device)
        with run.autocast():
            reconstruction, moments = self.net(x, noise)
        terms = negative_elbo(x, reconstruction, DiagonalGaussian(moments.float()), cfg.recon_std,
                              cfg.kl_weight)
        means = {name: value.mean() for name, value in terms.items()}
        run.optimizer_step(means["loss"] * run.loss_scale(len(x), B))
        return run.batch_means(means, len(x), B)

    def fit(self) -> TrainState:
        """Train, then measure the latent scaling factor and export `out_dir/vae/` (rank 0)."""
        self.vae.train()
        state = self.run.fit(self.train_step, self.sample_grid)
        self.vae.eval()
        if self.run.is_main:
            self.export(self.out_dir)
        return state

    def export(self, folder: str | Path) -> Path:
        """Measure the scaling factor, store it in the VAE's config, and write `folder/vae/`."""
        num_images = min(self.config.scale_images, len(self.dataset))
        factor = latent_scaling_factor(self.vae, self.dataset, num_images, seed=self.config.seed)
        exported = AutoencoderKL(dataclasses.replace(self.vae.config, scaling_factor=factor,
                                                     sample_size=self.image_shape[-1]))
        exported.load_state_dict(self.vae.state_dict())
        self.run.log({"scaling_factor": factor})
        return save_component(exported, folder, "vae")

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """The first images of the data set over their reconstructions (posterior means)."""
        images, _ = self.dataset.batch(torch.arange(min(GRID_IMAGES, len(self.dataset))), torch.Generator())
        was_training = self.vae.training
        self.vae.eval()
        reconstructions = self.vae.decode(self.vae.encode(images.to(self.run.device)).mean).cpu()
        self.vae.train(was_training)
        tiles = to_pil(torch.cat([images, reconstructions.clamp(-1, 1)]))
        save_png(image_grid(tiles, rows=2, cols=len(images)), path)

    def _check_checkpoint(self, meta: dict) -> None:
        if meta.get("kind") != "vae" or VAEConfig.from_dict(meta["vae"]) != self.vae.config:
            raise UserError("the checkpoint holds another kind of model or VAE config; resume with the same "
                            "settings")


def _check_shapes(config: VAEConfig, image_shape: tuple[int, ...]) -> None:
    channels, height, width = image_shape
    if channels != config.in_channels or channels != config.out_channels:
        raise UserError(f"the images have {channels} channel(s) but the VAE takes {config.in_channels} and "
                        f"makes {config.out_channels}")
    f = config.downsample_factor
    if height % f or width % f:
        raise UserError(f"the images are {height}x{width}: the VAE needs sides divisible by {f}")
