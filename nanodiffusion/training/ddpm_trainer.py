"""Training loop for pixel-space DDPM (Ho et al. 2020, Algorithm 1), with EMA, bf16 autocast and exact resume.

Every random draw (batch order, timesteps, noise, label dropout) comes from one torch.Generator whose state is
saved in the checkpoint, next to the global RNG that dropout uses: resuming replays the uninterrupted run
(the bookkeeping is `run_state.RunState`, shared with the latent text-to-image stages).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from nanodiffusion.data.datasets import ImageDataset
from nanodiffusion.diffusion.forward import q_sample
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import DDPMUNet, DDPMUNetConfig
from nanodiffusion.pipelines.ddpm import DDPMPipeline, model_metadata
from nanodiffusion.training import distributed
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.denoising import DenoisingConfig, denoising_loss
from nanodiffusion.training.ema import EMA
from nanodiffusion.training.run_state import RunState, TrainState


@dataclass(frozen=True)
class TrainConfig(DenoisingConfig):
    """Everything that defines a DDPM training run (saved in every checkpoint); see the base classes too."""

    out_dir: str = "runs/ddpm"
    label_dropout: float = 0.1            # p(label -> null class), for classifier-free guidance
    channels_last: bool = False           # slower on CPU here: its GroupNorm kernel outweighs faster convs

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


class DDPMTrainer(Checkpointed):
    """Owns the model, its EMA and the optimizer of one run (`run` holds the RNG and counters);
    `fit()` trains, `resume()` restores."""

    def __init__(self, config: TrainConfig, unet_config: DDPMUNetConfig, schedule: ScheduleConfig,
                 dataset: ImageDataset):
        _check_dataset(unet_config, dataset)
        self.config, self.unet_config, self.schedule, self.dataset = config, unet_config, schedule, dataset
        self.run = RunState(config, len(dataset.images))
        self.model = DDPMUNet(unet_config).to(self.run.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, config.ema_decay)
        # fused: one kernel for all parameters, CPU and GPU
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay, fused=True)
        self.run.register(self.optimizer, {"model": self.model, "ema": self.ema.shadow},
                          model_metadata(unet_config, schedule, config.prediction, dataset.class_names),
                          emas=(self.ema,))
        self.net = distributed.parallel(self.model)          # what the steps call: DDP under torchrun
        self.alphas_cumprod = get_alphas_cumprod(schedule).float().to(self.run.device)
        self.out_dir = Path(config.out_dir)

    @property
    def state(self) -> TrainState:
        return self.run.state

    @property
    def generator(self) -> torch.Generator:
        return self.run.generator

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """One optimizer step of Algorithm 1 on a global batch x0 in [-1, 1]; returns {"loss": ...}."""
        cfg, g, run = self.config, self.generator, self.run
        B = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if not self.model.config.num_classes:
            labels = None                              # an unconditional model ignores the dataset's labels
        elif labels is not None:
            drop = torch.rand(B, generator=g) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.model.null_class), labels)
        mine = run.shard(B)
        x0, t, noise = (v[mine].to(run.device) for v in (x0, t, noise))
        labels = labels[mine].to(run.device) if labels is not None else None
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        if cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            pred = self.net(x_t, t.float(), class_labels=labels)
        loss = denoising_loss(cfg, pred, x0, noise, t, self.alphas_cumprod)
        run.optimizer_step(loss * run.loss_scale(len(t), B))
        self.ema.update(self.model)
        return run.batch_means({"loss": loss}, len(t), B)

    def fit(self) -> TrainState:
        """Train until `epochs` (or `max_steps`) is reached, writing `last` and `best` checkpoints."""
        self.model.train()
        return self.run.fit(lambda indices: self.train_step(*self.dataset.batch(indices)), self._sample_grid)

    def _sample_grid(self, path: Path) -> None:
        pipe = DDPMPipeline(self.ema.shadow, self.schedule, self.config.prediction, self.dataset.class_names)
        pipe.sample_grid(path, num_images=16, sampler="ddim", num_steps=50, seed=0, progress=False)

    def _check_checkpoint(self, meta: dict) -> None:
        if meta.get("kind") != "ddpm" or DDPMUNetConfig.from_dict(meta["unet"]) != self.unet_config:
            raise UserError("the checkpoint was trained with a different UNet config; resume with the same "
                            "settings")


def _check_dataset(unet_config: DDPMUNetConfig, dataset: ImageDataset) -> None:
    _, C, H, W = dataset.images.shape
    if C != unet_config.in_channels:
        raise UserError(f"the dataset has {C} channel(s) but the model expects {unet_config.in_channels}")
    if (H, W) != (unet_config.image_size, unet_config.image_size):
        raise UserError(f"the dataset's images are {H}x{W} but the model expects "
                        f"{unet_config.image_size}x{unet_config.image_size}")
    if unet_config.num_classes and dataset.labels is None:
        raise UserError("the model is class-conditional but the dataset has no labels")
    if unet_config.num_classes and dataset.class_names and len(dataset.class_names) > unet_config.num_classes:
        raise UserError(f"the dataset has {len(dataset.class_names)} classes but the model only "
                        f"{unet_config.num_classes}")
