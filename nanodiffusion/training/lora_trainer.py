"""Training a LoRA (Hu et al. 2021) on a text-to-image model: the model stays frozen and only the low-rank
factors of its transformer layers (and, optionally, of its text encoder) learn eq. 2 of Rombach et al. 2022
on a captioned image folder, as kohya's sd-scripts do.

The step is the latent UNet trainer's (`LatentObjective`: cached VAE latents, caption dropout, noise, the
loss), with the networks called through `TrainableLoRA.adapted_weights`; the loop, resume and checkpoints are
`RunState`'s. The result, `out_dir/NAME.safetensors`, is a kohya/A1111 LoRA file (`<lora:NAME:1>`).
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.func import functional_call

from nanodiffusion.adapters.trainable_lora import TrainableLoRA, default_targets
from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.errors import UserError
from nanodiffusion.images import image_grid, save_png
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.denoising import DenoisingConfig
from nanodiffusion.training.ema import EMA
from nanodiffusion.training.latent_trainer import (
    GRID_COLUMNS, GRID_PROMPTS, GRID_STEPS, LATENT_CACHE, LatentObjective, cached_latents, first_captions,
)
from nanodiffusion.training.run_state import RunState, TrainState

SAMPLE_ADAPTER = "training"             # the adapter name of the LoRA while a sample grid is drawn


@dataclass(frozen=True)
class LoRATrainConfig(DenoisingConfig):
    """A LoRA training run (saved in every checkpoint); `prediction` must be the model's."""

    out_dir: str = "runs/lora"
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-4                      # kohya's default
    warmup_steps: int = 0
    name: str = "lora"                    # the file out_dir/NAME.safetensors; A1111's <lora:NAME:W>
    rank: int = 4
    alpha: float | None = None            # scale = alpha / rank; None: alpha = rank (scale 1)
    train_text_encoder: bool = False      # also a LoRA on the text encoder
    use_ema: bool = False                 # save the EMA of the LoRA (decay ema_decay) instead of its weights
    caption_dropout: float = 0.0          # p(caption -> ""), kohya's default 0
    sample_posterior: bool = False        # draw z ~ q(z|x) at each visit instead of using its mean
    sample_prompts: tuple[str, ...] = ()  # prompts of the sample grids (default: the first captions)
    sample_guidance_scale: float | None = None      # None: the model's default

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.name or any(c in self.name for c in "/\\:<>"):
            raise UserError(f"the LoRA name must be a file name without / \\ : < >, got {self.name!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class LoRATrainer(Checkpointed):
    """Trains a `TrainableLoRA` on `pipe`'s frozen networks over a captioned data set; `fit()` trains and
    writes `out_dir/NAME.safetensors`. `model` (name, A1111 hash) is recorded in checkpoints and the file."""

    def __init__(self, config: LoRATrainConfig, pipe: TextToImage, dataset: CaptionedDataset,
                 model: tuple[str, str | None]):
        if config.prediction != pipe.schedule.prediction:
            raise UserError(f"the model predicts {pipe.schedule.prediction}: train its LoRA on that target, "
                            f"not {config.prediction}")
        self.config, self.pipe, self.dataset, self.model = config, pipe, dataset, model
        self.run = RunState(config, len(dataset))
        if self.run.world_size > 1:
            raise UserError("train lora runs in one process: start it without torchrun")
        _check_image_size(dataset, pipe)
        pipe.to(self.run.device)
        for network in (pipe.unet, pipe.vae, pipe.text_encoder):
            network.eval().requires_grad_(False)
        self.out_dir = Path(config.out_dir)
        mean, std = cached_latents(pipe.vae, dataset, self.out_dir / LATENT_CACHE, seed=config.seed,
                                   bf16=config.bf16)
        scaling = pipe.vae.config.scaling_factor
        self.networks = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        targets = {"unet": default_targets("unet", pipe.unet)}
        if config.train_text_encoder:
            targets["text_encoder"] = default_targets("text_encoder", pipe.text_encoder)
        self.lora = TrainableLoRA(self.networks, targets, config.rank, config.lora_alpha, config.seed)
        self.lora.to(self.run.device)
        self.ema = EMA(self.lora, config.ema_decay) if config.use_ema else None
        self.optimizer = torch.optim.AdamW(self.lora.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        modules = {"lora": self.lora} | ({"lora_ema": self.ema.shadow} if self.ema else {})
        self.run.register(self.optimizer, modules, {
            "kind": "lora", "model": model[0], "model_hash": model[1], "rank": config.rank,
            "alpha": config.lora_alpha, "targets": targets}, (self.ema,) if self.ema else ())
        self.objective = LatentObjective(config, dataset, mean * scaling, std * scaling, pipe.tokenizer,
                                         pipe.schedule.alphas_cumprod.float().to(self.run.device))

    @property
    def state(self) -> TrainState:
        return self.run.state

    @property
    def lora_path(self) -> Path:
        return self.out_dir / f"{self.config.name}.safetensors"

    def _call(self, network: str, *args):
        """The frozen network with its LoRA-adapted weights (float32 sums, so gradients reach the LoRA)."""
        module = self.networks[network]
        return functional_call(module, self.lora.adapted_weights(network, module), args)

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One optimizer step of the LoRA on the batch at `indices`; returns {"loss": ...}."""
        text_encoder = functools.partial(self._call, "text_encoder") if self.config.train_text_encoder \
            else self.pipe.text_encoder
        loss, count = self.objective.loss(self.run, indices, functools.partial(self._call, "unet"),
                                          text_encoder)
        self.run.optimizer_step(loss)
        if self.ema is not None:
            self.ema.update(self.lora)
        return self.run.batch_means({"loss": loss}, count, len(indices))

    def fit(self) -> TrainState:
        """Train, then write out_dir/NAME.safetensors (the EMA of the LoRA when use_ema)."""
        self.lora.train()
        state = self.run.fit(self.train_step, self.sample_grid)
        self.export(self.lora_path)
        return state

    def export(self, path: str | Path) -> Path:
        """Write the LoRA (its EMA when use_ema) as a kohya/A1111 file, with kohya's header entries."""
        lora = self.ema.shadow if self.ema is not None else self.lora
        cfg, size = self.config, self.dataset.image_size
        return lora.save_kohya(path, {
            "ss_sd_model_name": self.model[0], "ss_sd_model_hash": self.model[1] or "",
            "ss_num_train_images": str(len(self.dataset)), "ss_steps": str(self.state.step),
            "ss_epoch": str(self.state.epoch), "ss_learning_rate": f"{cfg.lr:g}",
            "ss_resolution": f"({size}, {size})", "ss_seed": str(cfg.seed),
            "ss_caption_dropout_rate": f"{cfg.caption_dropout:g}"})

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """One row per prompt, GRID_COLUMNS seeds each, with the LoRA as it is now (loaded from its file,
        written first, as any LoRA is: the grid shows what the file gives)."""
        prompts = list(self.config.sample_prompts) or first_captions(self.dataset, GRID_PROMPTS)
        pipe = self.pipe
        pipe.show_progress = False
        pipe.load_lora_weights(self.export(self.lora_path), adapter_name=SAMPLE_ADAPTER)
        try:
            guidance = {} if self.config.sample_guidance_scale is None \
                else {"guidance_scale": self.config.sample_guidance_scale}
            size = self.dataset.image_size
            images = pipe(prompts, num_images_per_prompt=GRID_COLUMNS, seed=0, num_steps=GRID_STEPS,
                          height=size, width=size, **guidance).images
        finally:
            pipe.unload_lora_weights()                  # the frozen weights come back bit for bit
        save_png(image_grid(images, rows=len(prompts), cols=GRID_COLUMNS), path)

    def _check_checkpoint(self, meta: dict) -> None:
        if meta.get("kind") != "lora":
            raise UserError("the checkpoint is not a `train lora` checkpoint")
        same = (meta["rank"] == self.config.rank and meta["alpha"] == self.config.lora_alpha
                and meta["targets"] == self.lora.targets and meta["train"]["use_ema"] == self.config.use_ema)
        if not same:
            raise UserError("the checkpoint trained another LoRA (rank, alpha, text-encoder LoRA or EMA "
                            "differ); resume with the same settings")
        if meta.get("model_hash") != self.model[1]:
            raise UserError(f"the checkpoint trained a LoRA for model {meta.get('model')} (hash "
                            f"{meta.get('model_hash')}), not {self.model[0]} ({self.model[1]})")


def _check_image_size(dataset: CaptionedDataset, pipe: TextToImage) -> None:
    factor = pipe.vae_factor
    if dataset.image_size % factor:
        raise UserError(f"the images are {dataset.image_size} pixels wide: the VAE needs a multiple of "
                        f"{factor} (pass --image-size, e.g. the model's {pipe.native_size})")
