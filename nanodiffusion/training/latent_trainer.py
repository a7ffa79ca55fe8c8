"""Training the text-conditioned UNet of a latent diffusion model (Rombach et al. 2022, §3.3, eq. 2).

The data set is encoded once by the frozen VAE (under bf16 autocast when training in bf16) and its latents are
kept in memory, scaled by the VAE's `scaling_factor`: by default the posterior means, or with
`sample_posterior` a fresh draw z ~ q(z|x) at each visit. They are cached in `out_dir/latents.safetensors`,
keyed by a hash of the VAE weights and the images, so a resumed run does not encode them again. Captions are
dropped to "" with probability `caption_dropout`, as SD does, so that the one network also learns the
unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022). The text encoder is frozen
(pre-trained by `train text-encoder`, as SD freezes CLIP) or trained jointly with the UNet
(`train_text_encoder`: its parameters join the UNet's optimizer and EMA). The result is a diffusers Stable
Diffusion folder that `TextToImage.from_pretrained` and diffusers' StableDiffusionPipeline load.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nanodiffusion.data.captioned import CaptionedDataset
from nanodiffusion.diffusion.forward import q_sample
from nanodiffusion.diffusion.schedules import ScheduleConfig, get_alphas_cumprod
from nanodiffusion.errors import UserError
from nanodiffusion.images import image_grid, save_png
from nanodiffusion.nets.clip_text import CLIPTextConfig, CLIPTextModel
from nanodiffusion.nets.sd_unet import SDUNet, SDUNetConfig
from nanodiffusion.nets.vae import AutoencoderKL, VAEConfig
from nanodiffusion.pipelines.text_to_image import TextToImage
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.training import distributed
from nanodiffusion.training.captions import check_tokenizer
from nanodiffusion.training.checkpointed import Checkpointed
from nanodiffusion.training.denoising import DenoisingConfig, denoising_loss
from nanodiffusion.training.ema import EMA
from nanodiffusion.training.export import scheduler_config
from nanodiffusion.training.run_state import RunState, TrainState
from nanodiffusion.validation import check_float, check_text
from nanodiffusion.weights import SDComponents, save_diffusers
from nanodiffusion.weights.checkpoint import load_checkpoint, save_checkpoint

# A small SD UNet for 8x8x4 latents (32x32 images) and 128-wide text states: 10M parameters.
SMALL_UNET = SDUNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(1, 2), num_heads=4,
                          context_dim=128, sample_size=8)
PIPELINE_FOLDER = "pipeline"            # the diffusers folder written under out_dir at the end
LATENT_CACHE = "latents.safetensors"    # the encoded data set, under out_dir
GRID_PROMPTS, GRID_COLUMNS, GRID_STEPS = 4, 4, 25


@dataclass(frozen=True)
class LatentTrainConfig(DenoisingConfig):
    """A latent UNet training run (saved in every checkpoint); see the base classes for the rest."""

    out_dir: str = "runs/unet"
    caption_dropout: float = 0.1          # p(caption -> ""), for classifier-free guidance
    train_text_encoder: bool = False      # False: the text encoder is frozen; True: trained with the UNet
    sample_posterior: bool = False        # draw z ~ q(z|x) at each visit instead of using its mean
    sample_prompts: tuple[str, ...] = ()  # prompts of the sample grids (default: the first captions)
    sample_guidance_scale: float = 4.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        check_float("sample_guidance_scale", self.sample_guidance_scale, minimum=0)
        for i, prompt in enumerate(self.sample_prompts):
            check_text(f"sample_prompts[{i}]", prompt)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, dataset: CaptionedDataset, *, batch_size: int = 256, seed: int = 0,
                   bf16: bool = False, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled posterior means and standard deviations (N, C, h, w), float32 on the CPU, of every image
    (`dataset.batch` is called with Generator(seed)); `bf16` runs the encoder under bf16 autocast."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    means, stds = [], []
    chunks = torch.arange(len(dataset)).split(batch_size)
    for chunk in tqdm(chunks, desc="encoding the images", unit="batch", disable=not progress, leave=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(dataset.batch(chunk, generator)[0].to(device))
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def latents_key(vae: AutoencoderKL, dataset: CaptionedDataset, seed: int, bf16: bool) -> str:
    """A hash of everything the encoded latents depend on: VAE config and weights, the images, seed, dtype."""
    digest = hashlib.sha256(json.dumps([vae.config.to_dict(), seed, bf16]).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(dataset.images.contiguous().numpy().data)
    return digest.hexdigest()


def cached_latents(vae: AutoencoderKL, dataset: CaptionedDataset, cache: Path, *, seed: int, bf16: bool,
                   write: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_dataset`'s result, read from `cache` when it holds the latents of this VAE and these images,
    else computed (and written there, atomically, when `write`)."""
    key = latents_key(vae, dataset, seed, bf16)
    if cache.is_file():
        tensors, meta = load_checkpoint(cache)
        if meta.get("key") == key:
            return tensors["mean"], tensors["std"]
    mean, std = encode_dataset(vae, dataset, seed=seed, bf16=bf16, progress=write)
    if write:
        save_checkpoint(cache, {"mean": mean, "std": std}, {"key": key})
    return mean, std


@dataclass(frozen=True)
class LatentObjective:
    """Eq. 2 on cached latents: what one training step draws (captions, dropped with `caption_dropout`;
    timesteps; noise; posterior samples) and the loss it computes. `train lora` shares it (lora_trainer.py).

    `config` needs caption_dropout, sample_posterior, train_text_encoder, prediction and min_snr_gamma.
    """

    config: LatentTrainConfig
    dataset: CaptionedDataset
    latent_mean: torch.Tensor               # (N, C, h, w), scaled by the VAE's scaling_factor
    latent_std: torch.Tensor
    tokenizer: CLIPTokenizer
    alphas_cumprod: torch.Tensor            # float32, on the training device

    def loss(self, run: RunState, indices: torch.Tensor, unet, text_encoder) -> tuple[torch.Tensor, int]:
        """The mean loss over this rank's part of the global batch at `indices`, and that part's size.

        `unet(x_t, t, context)` and `text_encoder(input_ids)` are the networks as trained (text gradients
        flow only with config.train_text_encoder); every random draw comes from `run.generator`."""
        cfg, g = self.config, run.generator
        B = len(indices)
        captions = self.dataset.captions(indices, g)     # the images are already cached as latents
        drop = torch.rand(B, generator=g) < cfg.caption_dropout
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        t = torch.randint(0, len(self.alphas_cumprod), (B,), generator=g)
        noise = torch.randn((B, *self.latent_mean.shape[1:]), generator=g)
        z = self.latent_mean[indices]
        if cfg.sample_posterior:
            z = z + self.latent_std[indices] * torch.randn(z.shape, generator=g)
        mine = run.shard(B)
        z, t, noise = (v[mine].to(run.device) for v in (z, t, noise))
        input_ids = self.tokenizer(captions[mine]).to(run.device)    # (b, L): padded as at inference
        x_t = q_sample(z, t, noise, self.alphas_cumprod)
        with run.autocast():
            with torch.set_grad_enabled(cfg.train_text_encoder):
                context = text_encoder(input_ids).hidden_states      # (b, L, context_dim)
            pred = unet(x_t, t.float(), context)
        return denoising_loss(cfg, pred, z, noise, t, self.alphas_cumprod), len(t)


def first_captions(dataset: CaptionedDataset, count: int) -> list[str]:
    """The first `count` distinct canonical captions of the data set's first items (sample-grid prompts)."""
    first = (dataset.caption(i) for i in range(min(len(dataset), 16 * count)))
    return list(dict.fromkeys(first))[:count]


class LatentTrainer(Checkpointed):
    """Trains an SDUNet (and, jointly, the text encoder) on a captioned data set's VAE latents;
    `fit()` trains and writes the diffusers folder `out_dir/pipeline/`."""

    def __init__(self, config: LatentTrainConfig, unet_config: SDUNetConfig, schedule: ScheduleConfig,
                 dataset: CaptionedDataset, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer):
        check_tokenizer(tokenizer, text_encoder.config)
        self.config, self.schedule, self.dataset, self.tokenizer = config, schedule, dataset, tokenizer
        self.run = RunState(config, len(dataset))
        device = self.run.device
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.out_dir = Path(config.out_dir)
        mean, std = cached_latents(self.vae, dataset, self.out_dir / LATENT_CACHE, seed=config.seed,
                                   bf16=config.bf16, write=self.run.is_main)
        _check_configs(unet_config, vae.config, text_encoder.config, mean.shape)
        self.latent_mean, self.latent_std = mean * vae.config.scaling_factor, std * vae.config.scaling_factor
        self.unet = SDUNet(unet_config).to(device)
        self.ema = EMA(self.unet, config.ema_decay)
        joint = config.train_text_encoder
        self.text_encoder = text_encoder.to(device).train(joint).requires_grad_(joint)
        modules, emas = {"unet": self.unet, "unet_ema": self.ema.shadow}, (self.ema,)
        parameters = list(self.unet.parameters())
        if joint:
            self.text_ema = EMA(self.text_encoder, config.ema_decay)
            modules |= {"text_encoder": self.text_encoder, "text_encoder_ema": self.text_ema.shadow}
            emas += (self.text_ema,)
            parameters += list(self.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=True)
        self.run.register(self.optimizer, modules, {
            "kind": "latent_unet", "unet": unet_config.to_dict(), "schedule": schedule.to_dict(),
            "prediction": config.prediction, "vae": vae.config.to_dict(),
            "text_encoder": text_encoder.config.to_dict(),
            "tokenizer_merges": [list(pair) for pair in tokenizer.merges]}, emas)
        self.unet_net = distributed.parallel(self.unet)
        self.text_net = distributed.parallel(self.text_encoder) if joint else self.text_encoder
        self.alphas_cumprod = get_alphas_cumprod(schedule).float().to(device)
        self.objective = LatentObjective(config, dataset, self.latent_mean, self.latent_std, tokenizer,
                                         self.alphas_cumprod)

    @property
    def state(self) -> TrainState:
        return self.run.state

    @torch.no_grad()
    def init_unet(self, unet: SDUNet) -> None:
        """Start from the weights of a trained UNet of the same config (fine-tuning); its EMA too."""
        if unet.config != self.unet.config:
            raise UserError("the UNet to start from has another config than the one being trained")
        for module in (self.unet, self.ema.shadow):
            module.load_state_dict(unet.state_dict(), strict=True)

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One optimizer step of eq. 2 on the global batch at `indices`; returns {"loss": ...}."""
        run = self.run
        loss, count = self.objective.loss(run, indices, self.unet_net, self.text_net)
        run.optimizer_step(loss * run.loss_scale(count, len(indices)))
        self.ema.update(self.unet)
        if self.config.train_text_encoder:
            self.text_ema.update(self.text_encoder)
        return run.batch_means({"loss": loss}, count, len(indices))

    def fit(self) -> TrainState:
        """Train, then write the diffusers folder `out_dir/pipeline/` with the EMA weights (rank 0)."""
        self.unet.train()
        state = self.run.fit(self.train_step, self.sample_grid)
        if self.run.is_main:
            self.export(self.out_dir / PIPELINE_FOLDER)
        return state

    def components(self) -> SDComponents:
        """The model as SDComponents: the EMA UNet (and EMA text encoder when trained), VAE, tokenizer and
        the scheduler config of our schedule and prediction type."""
        text_encoder = self.text_ema.shadow if self.config.train_text_encoder else self.text_encoder
        return SDComponents(unet=self.ema.shadow, vae=self.vae, text_encoder=text_encoder,
                            tokenizer=self.tokenizer,
                            scheduler_config=scheduler_config(self.schedule, self.config.prediction))

    def export(self, folder: str | Path) -> Path:
        """Write the model as a diffusers Stable Diffusion folder."""
        save_diffusers(self.components(), folder)
        return Path(folder)

    def pipeline(self) -> TextToImage:
        """A TextToImage pipeline on the current EMA weights."""
        parts = self.components()
        return TextToImage(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config)

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """One row per prompt, GRID_COLUMNS seeds each, through TextToImage with the EMA weights."""
        prompts = list(self.config.sample_prompts) or first_captions(self.dataset, GRID_PROMPTS)
        pipe = self.pipeline()
        pipe.show_progress = False
        height, width = (side * self.vae.config.downsample_factor for side in self.latent_mean.shape[2:])
        images = pipe(prompts, num_images_per_prompt=GRID_COLUMNS, seed=0, num_steps=GRID_STEPS,
                      height=height, width=width, guidance_scale=self.config.sample_guidance_scale).images
        save_png(image_grid(images, rows=len(prompts), cols=GRID_COLUMNS), path)

    def _check_checkpoint(self, meta: dict) -> None:
        same = (meta.get("kind") == "latent_unet"
                and SDUNetConfig.from_dict(meta["unet"]) == self.unet.config
                and ScheduleConfig.from_dict(meta["schedule"]) == self.schedule
                and VAEConfig.from_dict(meta["vae"]) == self.vae.config
                and CLIPTextConfig.from_dict(meta["text_encoder"]) == self.text_encoder.config
                and meta["train"]["train_text_encoder"] == self.config.train_text_encoder)
        if not same:
            raise UserError("the checkpoint was trained with other models or settings (UNet, schedule, VAE, "
                            "text encoder, or frozen versus trained text encoder); resume with the same ones")
        if [tuple(pair) for pair in meta["tokenizer_merges"]] != list(self.tokenizer.merges):
            raise UserError("the checkpoint was trained with another tokenizer")


def _check_configs(unet: SDUNetConfig, vae: VAEConfig, text: CLIPTextConfig,
                   latent_shape: torch.Size) -> None:
    _, channels, height, width = latent_shape
    if unet.in_channels != channels or unet.out_channels != channels:
        raise UserError(f"the VAE makes {channels}-channel latents but the UNet takes {unet.in_channels} and "
                        f"predicts {unet.out_channels}")
    if unet.context_dim != text.hidden_size:
        raise UserError(f"the UNet attends to {unet.context_dim}-wide text states but the text encoder gives "
                        f"{text.hidden_size}")
    if unet.sample_size not in (height, (height, width)):
        raise UserError(f"the latents are {height}x{width} but the UNet's sample_size is {unet.sample_size}: "
                        f"set it to the latent side (pipelines make images of sample_size x "
                        f"{vae.downsample_factor} pixels)")
