"""Training throughput (images/s) of nanodiffusion's latent text-to-image trainer against a straightforward loop
on the reference implementation (issue 6, training).

Both train the same network configuration, the shipped built-in model's size (an SD UNet of 64 channels at
8x8x4 latents, a 4-layer 128-wide CLIP text encoder trained jointly), on the same captioned shapes scenes:
    reference   diffusers' UNet2DConditionModel + transformers' CLIPTextModel and CLIPTokenizer, a plain loop:
                tokenize, encode, noise, predict, MSE, AdamW; fp32 and under bf16 autocast
    ours        LatentTrainer.train_step (caption dropout, EMA of both networks, fused AdamW), fp32 and bf16,
                at CLIP's 77-token context and at the 24 tokens the built-in model uses

    python benchmarks/latent_train_speed.py [--threads 2] [--steps 10] [--batch-size 128]
"""

import argparse
import dataclasses
import tempfile
import time

import torch
import torch.nn.functional as F

from nanodiffusion.data.captioned import shapes_captioned
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.nets.vae import AutoencoderKL
from nanodiffusion.training.captions import SMALL_TEXT, caption_tokenizer, new_text_encoder
from nanodiffusion.training.latent_trainer import SMALL_UNET, LatentTrainConfig, LatentTrainer
from nanodiffusion.training.vae_trainer import SMALL_VAE

WARMUP = 2


def timed(step, steps: int, batch_size: int) -> float:
    """images/s of `step()` over `steps` calls after WARMUP ones."""
    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def reference_step_fn(trainer: LatentTrainer, folder: str, batch_size: int, bf16: bool):
    """A plain diffusers/transformers loop on the trainer's latents, captions and configuration."""
    import diffusers
    import transformers
    trainer.tokenizer.save_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **trainer.text_encoder.config.to_transformers_config()))
    unet = diffusers.UNet2DConditionModel.from_config(trainer.unet.config.to_diffusers_config())
    optimizer = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4)
    alphas_cumprod = trainer.alphas_cumprod
    latents, dataset = trainer.latent_mean, trainer.dataset
    generator = torch.Generator().manual_seed(0)

    def step():
        indices = torch.randint(0, len(latents), (batch_size,), generator=generator)
        captions = dataset.captions(indices, generator)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        z = latents[indices]
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (batch_size,))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            states = text(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=states).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def ours_step_fn(trainer: LatentTrainer, batch_size: int):
    generator = torch.Generator().manual_seed(0)
    trainer.unet.train()
    return lambda: trainer.train_step(torch.randint(0, len(trainer.latent_mean), (batch_size,),
                                                    generator=generator))


def make_trainer(dataset, work: str, *, max_tokens: int, bf16: bool) -> LatentTrainer:
    torch.manual_seed(0)
    vae = AutoencoderKL(dataclasses.replace(SMALL_VAE, in_channels=3, out_channels=3)).eval()
    tokenizer = caption_tokenizer(dataset, 1024, max_tokens)
    text_encoder = new_text_encoder(tokenizer, SMALL_TEXT)
    config = LatentTrainConfig(out_dir=work, bf16=bf16, train_text_encoder=True, warmup_steps=0)
    unet_config = dataclasses.replace(SMALL_UNET, in_channels=4, out_channels=4, sample_size=8)
    return LatentTrainer(config, unet_config, ScheduleConfig("scaled_linear"), dataset, vae, text_encoder,
                         tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = shapes_captioned(2048, 32)
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {args.threads} threads, batch "
          f"{args.batch_size}, {args.steps} timed steps after {WARMUP}; UNet {SMALL_UNET.model_channels} "
          f"channels {SMALL_UNET.channel_mult}, text encoder {SMALL_TEXT.num_layers}x{SMALL_TEXT.hidden_size} "
          "trained jointly")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for bf16 in (False, True):
            precision = "bf16 autocast" if bf16 else "fp32"
            trainer = make_trainer(dataset, work, max_tokens=77, bf16=bf16)
            rows.append((f"reference, 77 tokens ({precision})",
                         timed(reference_step_fn(trainer, work, args.batch_size, bf16), args.steps,
                               args.batch_size)))
            rows.append((f"ours, 77 tokens ({precision})",
                         timed(ours_step_fn(trainer, args.batch_size), args.steps, args.batch_size)))
            trainer = make_trainer(dataset, work, max_tokens=24, bf16=bf16)
            rows.append((f"ours, 24 tokens ({precision})",
                         timed(ours_step_fn(trainer, args.batch_size), args.steps, args.batch_size)))
    reference = rows[0][1]
    print(f"\n{'configuration':<36}{'images/s':>10}{'vs reference fp32':>20}")
    for name, rate in rows:
        print(f"{name:<36}{rate:10.1f}{rate / reference:19.2f}x")


if __name__ == "__main__":
    main()
