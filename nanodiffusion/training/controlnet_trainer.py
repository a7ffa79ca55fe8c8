"""Training a ControlNet (Zhang et al. 2023, §3.3, eq. 5) on a frozen text-to-image model: the ControlNet
starts as a copy of the UNet's encoder with zero convolutions (`ControlNet.from_unet`), so training starts
from the model's own predictions, and learns to add residuals that make the UNet's ε follow a control map.

The control maps here are the Canny edges of the training images (`control_images.canny.edge_maps`), made
per batch. As in the paper, half the captions are replaced by "" (`caption_dropout`), so that the ControlNet
learns to read the map without the prompt's help. The images are encoded once by the frozen VAE and cached
like the latent trainer's (`cached_latents`); checkpoints, resume, progress and EMA are RunState's. The
result is a diffusers ControlNet folder `out_dir/controlnet/` (the EMA weights).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from nanodiffusion.control_images.canny import edge_maps
from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.diffusion.forward import q_sample
from nanodiffusion.errors import UserError
from nanodiffusion.images import image_grid, save_png, to_pil
from nanodiffusion.nets.controlnet import ControlNet, ControlNetConfig
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.denoising import DenoisingConfig, denoising_loss
from nanodiffusion.training.ema import EMA
from nanodiffusion.training.latent_trainer import LATENT_CACHE, cached_latents
from nanodiffusion.training.run_state import RunState, TrainState
from nanodiffusion.weights.controlnet import save_controlnet

CONTROLNET_FOLDER = "controlnet"        # the diffusers ControlNet folder written under out_dir at the end
GRID_ITEMS, GRID_STEPS = 6, 20


@dataclass(frozen=True)
class ControlNetTrainConfig(DenoisingConfig):
    """A ControlNet training run (saved in every checkpoint); see the base classes for the rest."""

    out_dir: str = "runs/controlnet"
    lr: float = 1e-4
    caption_dropout: float = 0.5          # p(caption -> ""), the paper's 50 %
    low_threshold: float = 100.0          # Canny thresholds of the control maps
    high_threshold: float = 200.0
    sample_guidance_scale: float = 7.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def edge_control(images: torch.Tensor, config: ControlNetTrainConfig) -> torch.Tensor:
    """(B, 3, H, W) float control maps in [0, 1], white Canny edges of uint8 RGB images (B, 3, H, W)."""
    edges = edge_maps(images.numpy(), config.low_threshold, config.high_threshold)     # (B, H, W) uint8
    return torch.from_numpy(edges).float().div(255)[:, None].expand(-1, 3, -1, -1)


class ControlNetTrainer(Checkpointed):
    """Trains a ControlNet on `pipe` (a TextToImage whose networks stay frozen) with edge maps of a
    captioned data set's images; `fit()` trains and writes `out_dir/controlnet/`."""

    def __init__(self, config: ControlNetTrainConfig, pipe: TextToImage, dataset: CaptionedDataset, *,
                 embedding_channels: tuple[int, ...], base_hash: str | None = None):
        if pipe.schedule.prediction != config.prediction:
            raise UserError(f"the model predicts {pipe.schedule.prediction}: train its ControlNet for that "
                            f"(--prediction {pipe.schedule.prediction})")
        if dataset.image_size != pipe.native_size or dataset.channels != 3:
            size = pipe.native_size
            raise UserError(f"the model makes {size}x{size} RGB images: train on those "
                            f"(the data set is {dataset.image_size}px with {dataset.channels} channels)")
        self.config, self.pipe, self.dataset = config, pipe, dataset
        self.run = RunState(config, len(dataset))
        device = self.run.device
        for network in (pipe.unet, pipe.vae, pipe.text_encoder):
            network.to(device).eval().requires_grad_(False)
        self.out_dir = Path(config.out_dir)
        mean, _ = cached_latents(pipe.vae, dataset, self.out_dir / LATENT_CACHE, seed=config.seed,
                                 bf16=config.bf16, write=self.run.is_main)
        self.latents = mean * pipe.vae.config.scaling_factor
        self.controlnet = ControlNet.from_unet(pipe.unet, embedding_channels=embedding_channels).to(device)
        if self.controlnet.config.downscale != pipe.vae_factor:
            raise UserError(f"embedding_channels {embedding_channels} downscale control images "
                            f"{self.controlnet.config.downscale}x, the model's latents {pipe.vae_factor}x: "
                            f"give {1 + pipe.vae_factor.bit_length() - 1} widths")
        self.ema = EMA(self.controlnet, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.controlnet.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        modules = {"controlnet": self.controlnet, "controlnet_ema": self.ema.shadow}
        self.run.register(self.optimizer, modules, {
            "kind": "controlnet", "controlnet": self.controlnet.config.to_dict(),
            "base_model_hash": base_hash,
            "prediction": config.prediction}, (self.ema,))
        self.alphas_cumprod = pipe.schedule.alphas_cumprod.float().to(device)
        self.sample_items = torch.arange(min(GRID_ITEMS, len(dataset)))

    @property
    def state(self) -> TrainState:
        return self.run.state

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One optimizer step of eq. 5 on the batch at `indices`; returns {"loss": ...}."""
        cfg, run, g = self.config, self.run, self.run.generator
        B = len(indices)
        captions = self.dataset.captions(indices, g)
        drop = torch.rand(B, generator=g) < cfg.caption_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        t = torch.randint(0, len(self.alphas_cumprod), (B,), generator=g)
        noise = torch.randn((B, *self.latents.shape[1:]), generator=g)
        z = self.latents[indices]
        hint = edge_control(self.dataset.images[indices], cfg)
        z, t, noise, hint = (v.to(run.device) for v in (z, t, noise, hint))
        x_t = q_sample(z, t, noise, self.alphas_cumprod)
        with torch.no_grad():
            context = self.pipe.text_encoder(self.pipe.tokenizer(captions).to(run.device)).hidden_states
        with run.autocast():
            down, mid = self.controlnet(x_t, t.float(), context, hint)
            pred = self.pipe.unet(x_t, t.float(), context, down_residuals=down, mid_residual=mid)
        loss = denoising_loss(cfg, pred.float(), z, noise, t, self.alphas_cumprod)
        run.optimizer_step(loss)
        self.ema.update(self.controlnet)
        return {"loss": loss.item()}

    def fit(self) -> TrainState:
        """Train, then write `out_dir/controlnet/` with the EMA weights."""
        self.controlnet.train()
        state = self.run.fit(self.train_step, self.sample_grid)
        if self.run.is_main:
            save_controlnet(self.ema.shadow, self.out_dir / CONTROLNET_FOLDER)
        return state

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Rows: the control map, the base model without and with the (EMA) ControlNet, for the first items'
        captions and edges."""
        items = self.sample_items
        maps = edge_control(self.dataset.images[items], self.config)
        prompts = [self.dataset.caption(int(i)) for i in items]
        self.pipe.controlnets.clear()
        settings = dict(seed=0, num_steps=GRID_STEPS, guidance_scale=self.config.sample_guidance_scale)
        without = self.pipe(prompts, **settings).images
        self.pipe.load_controlnet(self.ema.shadow)
        with_control = self.pipe(prompts, control_image=maps, **settings).images
        self.pipe.controlnets.clear()
        controls = to_pil(maps * 2 - 1)
        save_png(image_grid([*controls, *without, *with_control], rows=3, cols=len(items)), path)

    def _check_checkpoint(self, meta: dict) -> None:
        same = (meta.get("kind") == "controlnet"
                and ControlNetConfig.from_dict(meta["controlnet"]) == self.controlnet.config
                and meta.get("base_model_hash") == self.run.metadata["base_model_hash"])
        if not same:
            raise UserError("the checkpoint belongs to another ControlNet or base model; resume with the "
                            "same ones")
