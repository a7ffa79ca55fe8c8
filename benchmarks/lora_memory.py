"""LoRA memory and speed (issue 18): what applied LoRAs add to memory, and what they cost per step.

Memory is counted, not sampled: a LoRA applied by nanodiffusion/adapters/lora.py adds exactly one new tensor
per weight it touches (the original is set aside untouched, so restoring is exact). The script builds SD
v1.5's UNet and text encoder on the meta device (no weights, no time) and sums, for the layer sets that
published LoRAs adapt, the bytes of the touched weights against the whole model, in fp32 and bf16:

    kohya       sd-scripts' default LoRA: the transformers' linears and 1x1 convs, the text encoder's
    locon       kohya/LyCORIS LoCon: the same plus every resnet conv (3x3 too), time projection, resampler
    lcm-lora    LCM-LoRA's targets (Luo et al. 2023): LoCon's UNet layers, no text encoder

Measured memory: a UNet of --memory-channels base width is saved to a file, loaded the way load_sd loads
(memory-mapped as float32, or converted to bf16) in a fresh process, and an LCM-LoRA-shaped LoRA is applied;
the process's anonymous (private) resident memory is read from /proc/self/status before and after:

    fp32-mapped     float32 file, float32 model: the originals are file pages, given back once set aside
    bf16            float32 file converted to bf16: the originals are kept in memory (exact restores)
    bf16-one-shot   the same with LoRAAdapters(restorable=False): no originals (what a one-shot CLI needs)

Speed: a UNet of --channels base width (SD v1.5's layout otherwise) runs --steps CFG-batch steps at
--latent-size, without a LoRA and with a rank --rank LoCon LoRA applied; the per-step times should agree
(the networks are the same modules with other numbers), and the one-off apply time is printed.

    python benchmarks/lora_memory.py [--channels 64] [--latent-size 32] [--rank 32] [--steps 5]
                                     [--memory-channels 128]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nanodiffusion.adapters import LoRAAdapters
from nanodiffusion.nets.clip_text import SD15_TEXT, CLIPTextModel
from nanodiffusion.nets.sd_unet import SD15_UNET, SDUNet

ATTENTION = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LAYOUTS = {"kohya": (ATTENTION, TEXT), "locon": (ATTENTION + CONV, TEXT), "lcm-lora": (ATTENTION + CONV, ())}


def targets(network: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    return [name for name, module in network.named_modules()
            if suffixes and isinstance(module, (nn.Linear, nn.Conv2d)) and name.endswith(suffixes)]


def memory_table() -> None:
    with torch.device("meta"):
        networks = {"unet": SDUNet(SD15_UNET), "text_encoder": CLIPTextModel(SD15_TEXT)}
    total = sum(p.numel() for network in networks.values() for p in network.parameters())
    print(f"SD v1.5 UNet + text encoder: {total / 1e6:.1f} M parameters = {total * 4 / 2**30:.2f} GiB fp32, "
          f"{total * 2 / 2**30:.2f} GiB bf16")
    print(f"{'layout':10} {'layers':>6} {'touched M':>9} {'of model':>8} {'extra fp32':>10} {'extra bf16':>10}")
    for layout, (unet, text) in LAYOUTS.items():
        touched = [networks[net].get_submodule(name).weight.numel() for net, suffixes in
                   (("unet", unet), ("text_encoder", text)) for name in targets(networks[net], suffixes)]
        numel = sum(touched)
        print(f"{layout:10} {len(touched):6} {numel / 1e6:9.1f} {numel / total:8.0%} "
              f"{numel * 4 / 2**30:8.2f} G {numel * 2 / 2**30:8.2f} G")


def write_lora(unet: nn.Module, rank: int, path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name in targets(unet, ATTENTION + CONV):
        out_features, *input_shape = unet.get_submodule(name).weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, *input_shape, generator=generator) * 0.01
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, *(1,) * (len(input_shape) - 1),
                                                       generator=generator) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def step_times(unet: nn.Module, latent_size: int, steps: int) -> list[float]:
    x = torch.randn(2, 4, latent_size, latent_size)
    context = torch.randn(2, 77, unet.config.context_dim)
    t = torch.tensor([500.0, 500.0])
    times = []
    with torch.no_grad():
        unet(x, t, context)                                           # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            unet(x, t, context)
            times.append(time.perf_counter() - start)
    return times


def speed(args) -> None:
    from dataclasses import replace
    unet = SDUNet(replace(SD15_UNET, model_channels=args.channels)).eval()
    before = step_times(unet, args.latent_size, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        path = write_lora(unet, args.rank, Path(folder) / "locon.safetensors")
        adapters = LoRAAdapters({"unet": unet})
        start = time.perf_counter()
        adapters.load_lora_weights(path)
        applied = time.perf_counter() - start
        after = step_times(unet, args.latent_size, args.steps)
        adapters.fuse_lora()
        fused = step_times(unet, args.latent_size, args.steps)
    layers = len(adapters.adapters["locon"].targets)
    print(f"UNet width {args.channels}, latents {args.latent_size}², batch 2, rank-{args.rank} LoCon on "
          f"{layers} layers: applied in {applied:.2f} s")
    for name, times in (("no LoRA", before), ("LoRA applied", after), ("LoRA fused", fused)):
        print(f"  {name:13} step median {sorted(times)[len(times) // 2] * 1000:7.1f} ms, "
              f"min {min(times) * 1000:7.1f} ms")


def resident_mib() -> tuple[float, float]:
    """This process's resident memory, MiB: anonymous (private: RssAnon) and file pages (RssFile)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("RssAnon", "RssFile"))


def measure(mode: str, folder: Path) -> None:
    """In a fresh process: load the saved UNet as `mode` says, apply the LoRA, print the memory."""
    from nanodiffusion.nets.sd_unet import SDUNetConfig
    from nanodiffusion.weights.safe_load import read_safetensors
    config = SDUNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        unet = SDUNet(config)
    tensors, _ = read_safetensors(folder / "unet.safetensors")                    # memory-mapped
    if mode != "fp32-mapped":
        tensors = {key: value.to(torch.bfloat16) for key, value in tensors.items()}
    unet.load_state_dict(tensors, assign=True)
    del tensors
    for parameter in unet.parameters():                 # touch every page, as a first generation would
        parameter.detach().sum()
    loaded = resident_mib()
    adapters = LoRAAdapters({"unet": unet}, restorable=mode != "bf16-one-shot")
    adapters.load_lora_weights(folder / "lcm.safetensors")
    touched = sum(unet.get_submodule(name).weight.nbytes for _, name in adapters.adapters["lcm"].targets)
    weights = sum(p.nbytes for p in unet.parameters())
    now = resident_mib()
    print(f"  {mode:14} model {weights / 2**20:6.1f} MiB, LoRA touches {touched / 2**20:6.1f}; resident "
          f"anonymous + file: loaded {loaded[0]:6.1f} + {loaded[1]:6.1f}, with the LoRA {now[0]:6.1f} + "
          f"{now[1]:6.1f} MiB (total {now[0] + now[1] - loaded[0] - loaded[1]:+.1f})")


def memory_measured(args) -> None:
    from dataclasses import replace
    config = replace(SD15_UNET, model_channels=args.memory_channels)
    unet = SDUNet(config)
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        save_file(unet.state_dict(), str(folder / "unet.safetensors"))
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        write_lora(unet, args.rank, folder / "lcm.safetensors")
        del unet
        print(f"UNet width {args.memory_channels} from a file, rank-{args.rank} LCM-LoRA-shaped LoRA, "
              "each in a fresh process:")
        for mode in ("fp32-mapped", "bf16", "bf16-one-shot"):
            completed = subprocess.run([sys.executable, __file__, "--measure", mode, str(folder)],
                                       capture_output=True, text=True)
            print(completed.stdout.rstrip() or completed.stderr[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64, help="the UNet's base width (SD v1.5: 320)")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--memory-channels", type=int, default=128, help="width of the UNet for RSS")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]))
        return
    print(f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, {args.threads} threads, python "
          f"{sys.version.split()[0]}")
    memory_table()
    memory_measured(args)
    speed(args)


if __name__ == "__main__":
    main()
