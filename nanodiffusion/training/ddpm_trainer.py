"""Training loop for pixel-space DDPM (Ho et al. 2020, Algorithm 1), with EMA, bf16 autocast and exact resume.

Every random draw (batch order, timesteps, noise, label dropout) comes from one torch.Generator whose state is
saved in the checkpoint, next to the global RNG that dropout uses: resuming replays the uninterrupted run.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.data.datasets import ImageDataset
from nanodiffusion.diffusion.forward import PREDICTION_TYPES, diffusion_loss, min_snr_weights, q_sample, training_target
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import DDPMUNet, DDPMUNetConfig
from nanodiffusion.training.checkpoint import (
    load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, prefixed, save_checkpoint, unprefixed,
)
from nanodiffusion.training.ema import EMA


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a DDPM training run (saved in every checkpoint)."""

    out_dir: str = "runs/ddpm"
    epochs: int = 10
    max_steps: int | None = None          # stop early after this many optimizer steps (tiny runs, tests)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "constant"         # "constant" or "cosine" (decays to 10 % of lr by the last step)
    ema_decay: float = 0.999
    prediction: str = "epsilon"
    min_snr_gamma: float | None = None    # Hang et al. 2023; None = the simple unweighted loss
    label_dropout: float = 0.1            # p(label -> null class), for classifier-free guidance
    bf16: bool = False                    # bf16 autocast on CPU (AVX-512-BF16 / AMX)
    channels_last: bool = False           # measured slower on CPU: its GroupNorm kernel outweighs faster convs
    seed: int = 0
    save_every_steps: int = 0             # also checkpoint `last` every N steps (0: only at epoch ends)
    sample_every_epochs: int = 0          # write a sample grid every N epochs (0: never)

    def __post_init__(self):
        if self.prediction not in PREDICTION_TYPES:
            raise UserError(f"unknown prediction type {self.prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise UserError(f"unknown learning-rate schedule {self.lr_schedule!r}; valid: constant, cosine")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass
class TrainState:
    """Counters that advance during training; saved with the checkpoint."""

    epoch: int = 0                        # epochs completed
    step: int = 0                         # optimizer steps completed
    step_in_epoch: int = 0
    best_loss: float = math.inf
    epoch_loss_sum: float = 0.0
    losses: list = field(default_factory=list)   # per-step losses of this run (for inspection and tests)


class DDPMTrainer:
    """Owns the model, its EMA, the optimizer and the RNG of one run; `fit()` trains, `resume()` restores."""

    def __init__(self, config: TrainConfig, unet_config: DDPMUNetConfig, schedule: ScheduleConfig,
                 dataset: ImageDataset):
        _check_dataset(unet_config, dataset)
        self.config, self.unet_config, self.schedule, self.dataset = config, unet_config, schedule, dataset
        torch.manual_seed(config.seed)
        self.model = DDPMUNet(unet_config)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=True)       # one kernel for all parameters, CPU and GPU
        self.alphas_cumprod = get_alphas_cumprod(schedule).float()
        self.generator = torch.Generator().manual_seed(config.seed)
        self.epoch_generator_state = self.generator.get_state()
        self.state = TrainState()
        self.out_dir = Path(config.out_dir)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset.images) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    def _learning_rate(self) -> float:
        """Linear warm-up, then constant or cosine decay to 10 % of the peak at the last step."""
        cfg, step = self.config, self.state.step
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> float:
        """One optimizer step of Algorithm 1 on a batch x0 in [-1, 1]; returns the loss."""
        cfg, g = self.config, self.generator
        B = x0.shape[0]
        t = torch.randint(0, self.schedule.num_timesteps, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if not self.model.config.num_classes:
            labels = None                                  # an unconditional model ignores the dataset's labels
        elif labels is not None:
            drop = torch.rand(B, generator=g) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.model.null_class), labels)
        x_t = q_sample(x0, t, noise, self.alphas_cumprod)
        if cfg.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = self.model(x_t, t.float(), class_labels=labels)
        target = training_target(cfg.prediction, x0, noise, t, self.alphas_cumprod)
        weights = (min_snr_weights(cfg.prediction, t, self.alphas_cumprod, cfg.min_snr_gamma)
                   if cfg.min_snr_gamma else None)
        loss = diffusion_loss(pred, target, weights)
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.model)
        return loss.item()

    def _epoch_batches(self):
        """Yield (x0, labels) batches of this epoch in a permutation drawn at its start, from step_in_epoch on."""
        saved = self.generator.get_state()
        self.generator.set_state(self.epoch_generator_state)
        order = torch.randperm(len(self.dataset.images), generator=self.generator)
        if self.state.step_in_epoch == 0:                 # a fresh epoch: continue from after the permutation
            saved = self.generator.get_state()
        self.generator.set_state(saved)
        bs = self.config.batch_size
        for start in range(self.state.step_in_epoch * bs, len(order), bs):
            yield self.dataset.batch(order[start:start + bs])

    def fit(self) -> TrainState:
        """Train until `epochs` (or `max_steps`) is reached, writing `last` and `best` checkpoints."""
        cfg, st = self.config, self.state
        self.model.train()
        epochs_bar = tqdm(range(st.epoch, cfg.epochs), desc="epochs", initial=st.epoch, total=cfg.epochs)
        for _ in epochs_bar:
            bar = tqdm(total=self.steps_per_epoch, initial=st.step_in_epoch, desc=f"epoch {st.epoch + 1}",
                       leave=False)
            tic = time.perf_counter()
            for x0, labels in self._epoch_batches():
                loss = self.train_step(x0, labels)
                st.losses.append(loss)
                st.step += 1
                st.step_in_epoch += 1
                st.epoch_loss_sum += loss
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{bar.n * cfg.batch_size / (time.perf_counter() - tic):.0f}")
                if cfg.max_steps and st.step >= cfg.max_steps:
                    bar.close()
                    self.save("last")
                    return st
                if cfg.save_every_steps and st.step % cfg.save_every_steps == 0:
                    self.save("last")
            bar.close()
            self._end_epoch(epochs_bar)
        return st

    def _end_epoch(self, epochs_bar) -> None:
        st = self.state
        epoch_loss = st.epoch_loss_sum / max(st.step_in_epoch, 1)
        st.epoch += 1
        st.step_in_epoch, st.epoch_loss_sum = 0, 0.0
        self.epoch_generator_state = self.generator.get_state()
        epochs_bar.set_postfix(loss=f"{epoch_loss:.4f}")
        if epoch_loss < st.best_loss:
            st.best_loss = epoch_loss
            self.save("best")
        self.save("last")
        if self.config.sample_every_epochs and st.epoch % self.config.sample_every_epochs == 0:
            self._sample_grid(self.out_dir / "samples" / f"epoch_{st.epoch:04d}.png")

    def _sample_grid(self, path: Path) -> None:
        from nanodiffusion.pipelines.ddpm import DDPMPipeline
        pipe = DDPMPipeline(self.ema.shadow, self.schedule, self.config.prediction, self.dataset.class_names)
        pipe.sample_grid(path, num_images=16, sampler="ddim", num_steps=50, seed=0, progress=False)

    def save(self, name: str) -> Path:
        """Atomically write checkpoint `out_dir/name.safetensors` with everything needed to resume."""
        st = self.state
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        tensors = {**prefixed("model", self.model.state_dict()), **prefixed("ema", self.ema.shadow.state_dict()),
                   **prefixed("optim", opt_tensors),
                   "rng.generator": self.generator.get_state(), "rng.epoch_generator": self.epoch_generator_state,
                   "rng.torch": torch.get_rng_state()}
        meta = model_metadata(self.unet_config, self.schedule, self.config.prediction, self.dataset)
        state = {k: v for k, v in asdict(st).items() if k != "losses"}
        state["best_loss"] = None if math.isinf(st.best_loss) else st.best_loss   # strict JSON has no inf
        state["ema_updates"] = self.ema.num_updates
        meta |= {"train": asdict(self.config), "optimizer": opt_meta, "state": state}
        path = self.out_dir / f"{name}.safetensors"
        save_checkpoint(path, tensors, meta)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore model, EMA, optimizer, RNG and counters from a checkpoint written by `save`."""
        tensors, meta = load_checkpoint(path)
        if "state" not in meta:
            raise UserError(f"{path} holds no training state (it is an exported model); cannot resume from it")
        if DDPMUNetConfig.from_dict(meta["unet"]) != self.unet_config:
            raise UserError(f"{path} was trained with a different UNet config; resume with the same settings")
        self.model.load_state_dict(unprefixed("model", tensors))
        self.ema.shadow.load_state_dict(unprefixed("ema", tensors))
        optimizer_from_tensors(self.optimizer, unprefixed("optim", tensors), meta["optimizer"])
        self.generator.set_state(tensors["rng.generator"])
        self.epoch_generator_state = tensors["rng.epoch_generator"]
        torch.set_rng_state(tensors["rng.torch"])
        saved = dict(meta["state"])
        self.ema.num_updates = saved.pop("ema_updates", saved["step"])
        best = saved["best_loss"]
        self.state = TrainState(**{**saved, "best_loss": math.inf if best is None else best})


def model_metadata(unet_config: DDPMUNetConfig, schedule: ScheduleConfig, prediction: str,
                   dataset: ImageDataset | None = None, class_names=None) -> dict:
    """The JSON config stored with a model: what a sampler needs to rebuild and use it."""
    names = dataset.class_names if dataset is not None else class_names
    return {"kind": "ddpm", "unet": unet_config.to_dict(), "schedule": schedule.to_dict(),
            "prediction": prediction, "class_names": list(names) if names else None}


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
