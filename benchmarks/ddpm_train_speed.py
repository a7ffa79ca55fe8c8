"""Training throughput (images/s) of nanodiffusion's DDPM trainer against a straightforward tutorial loop.

The reference is the classic DDPM-on-Fashion-MNIST tutorial's loop written plainly: a DataLoader over
per-image float tensors (as torchvision's ToTensor + Normalize would give), fp32, NCHW, Adam, its small UNet.
Ours is `DDPMTrainer.train_step` on in-memory uint8 batches, for both presets, in fp32 and bf16 autocast.

    python benchmarks/ddpm_train_speed.py [--threads 2] [--steps 20] [--data-dir ../shared/data]

Prints one row per configuration and the ratio to the reference. Falls back to random images without the data.
"""

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from nanodiffusion.data.datasets import ImageDataset, load_dataset
from nanodiffusion.diffusion.schedules import ScheduleConfig
from nanodiffusion.errors import UserError
from nanodiffusion.nets.ddpm_unet import DDPMUNet, UNET_PRESETS
from nanodiffusion.training.ddpm_trainer import DDPMTrainer, TrainConfig


def get_dataset(data_dir: str | None, n: int) -> ImageDataset:
    try:
        full = load_dataset("fashion-mnist", data_dir=data_dir)
        return ImageDataset(full.images[:n], full.labels[:n], full.class_names)
    except UserError:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
        return ImageDataset(images, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def reference_images_per_s(dataset: ImageDataset, steps: int, batch_size: int) -> float:
    """The tutorial's loop: DataLoader of per-image tensors, fp32, Adam, MSE on eps, 1000-step linear schedule."""
    images = [(img.float() / 255 - 0.5) * 2 for img in dataset.images]          # per-item tensors, as ToTensor
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True, drop_last=True)
    config = dataclasses.replace(UNET_PRESETS["tutorial"])
    model = DDPMUNet(config)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    betas = torch.linspace(1e-4, 0.02, 1000)
    alpha_bars = torch.cumprod(1 - betas, 0)
    done, tic = 0, None
    while done < steps + 2:
        for x0 in loader:
            if done == 2:
                tic = time.perf_counter()                                         # two warm-up steps
            n = len(x0)
            eta = torch.randn_like(x0)
            t = torch.randint(0, 1000, (n,))
            a_bar = alpha_bars[t]
            noisy = a_bar.sqrt().reshape(n, 1, 1, 1) * x0 + (1 - a_bar).sqrt().reshape(n, 1, 1, 1) * eta
            eta_theta = model(noisy, t.float())
            loss = F.mse_loss(eta_theta, eta)
            optim.zero_grad()
            loss.backward()
            optim.step()
            done += 1
            if done == steps + 2:
                break
    return steps * batch_size / (time.perf_counter() - tic)


def ours_images_per_s(dataset: ImageDataset, preset: str, bf16: bool, steps: int, batch_size: int) -> float:
    unet = dataclasses.replace(UNET_PRESETS[preset], image_size=28, in_channels=1, out_channels=1)
    if unet.arch == "resnet":
        unet = dataclasses.replace(unet, num_classes=10)
    config = TrainConfig(out_dir="/tmp/nanodiffusion-bench", batch_size=batch_size, bf16=bf16, warmup_steps=0)
    trainer = DDPMTrainer(config, unet, ScheduleConfig("linear"), dataset)
    trainer.model.train()
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 2):
        if i == 2:
            tic = time.perf_counter()
        x0, labels = dataset.batch(torch.randint(0, len(dataset), (batch_size,), generator=g))
        trainer.train_step(x0, labels)
    return steps * batch_size / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = get_dataset(args.data_dir, 4096)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, {args.steps} steps")
    ref = reference_images_per_s(dataset, args.steps, args.batch_size)
    print(f"{'configuration':42s} {'images/s':>9s} {'speed-up':>13s}")
    print(f"{'reference tutorial loop (fp32, DataLoader)':42s} {ref:9.1f} {1.0:12.2f}x")
    for preset in ("tutorial", "default"):
        for bf16 in (False, True):
            ips = ours_images_per_s(dataset, preset, bf16, args.steps, args.batch_size)
            name = f"ours {preset} ({'bf16 autocast' if bf16 else 'fp32'})"
            print(f"{name:42s} {ips:9.1f} {ips / ref:12.2f}x")


if __name__ == "__main__":
    main()
