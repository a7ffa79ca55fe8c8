"""What a ControlNet costs per sampling step (issue 16): one classifier-free-guidance step (batch 2) of the
UNet alone, of the ControlNet alone, and of both as the pipeline runs them (`controlled_unet`), in fp32 and
bf16 (channels_last on a CPU, as the pipeline's bf16 default). A ControlNet is a copy of the UNet's encoder
and middle block, so it should cost about half a UNet step or less.

    python benchmarks/controlnet_step.py                  # the built-in model, 32x32 images
    python benchmarks/controlnet_step.py --sd15 --latent-size 32 --dtypes bf16 --repeats 2
                                                          # SD v1.5's sizes, random weights, 256x256 images
"""

import argparse
import time

import torch

from builtin_t2i_speed import best_time          # benchmarks/ is the script's folder, first on the path


def networks(sd15: bool, dtype: torch.dtype):
    """(UNet, ControlNet) with their weights in `dtype`: the built-in model's UNet with a ControlNet copied
    from it, or SD v1.5-sized ones with random weights (built in `dtype`: no fp32 copy is held)."""
    from nanodiffusion.nets.controlnet import ControlNet
    from nanodiffusion.nets.sd_unet import SD15_UNET, SDUNet
    if sd15:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            unet = SDUNet(SD15_UNET).eval()
            controlnet = ControlNet.from_unet(unet).eval()
        finally:
            torch.set_default_dtype(previous)
    else:
        from nanodiffusion.pipelines.text_to_image import TextToImage
        unet = TextToImage.from_pretrained("builtin", dtype=dtype).unet
        controlnet = ControlNet.from_unet(unet, embedding_channels=(16, 32, 64)).eval()
    for parameter in controlnet.parameters():                # the zero convolutions as a trained net's
        parameter.data.normal_(0, 0.02)
    if dtype != torch.float32:
        unet.to(memory_format=torch.channels_last)
        controlnet.to(memory_format=torch.channels_last)
    return unet, controlnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", action="store_true", help="SD v1.5's sizes with random weights")
    parser.add_argument("--latent-size", type=int, default=None, help="default: 8 (built-in), 32 (--sd15)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nanodiffusion.diffusion.denoisers import ControlUnit, controlled_unet

    size = args.latent_size or (32 if args.sd15 else 8)
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {args.threads} threads; "
          f"{'SD v1.5 sizes' if args.sd15 else 'built-in model'}, latents {size}x{size}, CFG batch 2")
    print(f"\n{'dtype':<6}{'UNet s':>10}{'ControlNet s':>14}{'both s':>10}{'ControlNet / UNet':>20}"
          f"{'both / UNet':>14}")
    for name in args.dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        unet, controlnet = networks(args.sd15, dtype)
        factor = controlnet.config.downscale
        x = torch.randn(2, 4, size, size, dtype=dtype)
        t = torch.tensor([500.0, 500.0])
        context = torch.randn(2, 77, unet.config.context_dim, dtype=dtype)
        image = torch.rand(1, 3, size * factor, size * factor)
        net = controlled_unet(unet, [ControlUnit(controlnet, image)])
        with torch.no_grad():
            alone = best_time(lambda: unet(x, t, context), args.repeats)
            control = best_time(lambda: controlnet(x, t, context, image.expand(2, -1, -1, -1)), args.repeats)
            both = best_time(lambda: net(x, t, context), args.repeats)
        print(f"{name:<6}{alone:10.4f}{control:14.4f}{both:10.4f}{control / alone:20.2f}{both / alone:14.2f}")
        del unet, controlnet, net


if __name__ == "__main__":
    main()
