"""SD v1.5-sized weights: save both layouts, load them into nanodiffusion and into diffusers/transformers.

Builds the full SD v1.5 UNet, VAE and text encoder with seeded random weights, writes a diffusers folder and
an original single file, then loads each in a fresh process (so peak RSS is that load's alone) and runs the
same inputs through every loaded copy: UNet eps, VAE decode, text encoder hidden states. Prints the max-abs
differences against our load of the diffusers folder, the load times and the peak RSS of each load.

    OMP_NUM_THREADS=1 python benchmarks/sd15_weights.py --latent-size 16
"""

import argparse
import contextlib
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# (mode, what is loaded); every mode computes the outputs except the dtype-conversion ones
MODES = {
    "ours-folder": "nanodiffusion load_sd(diffusers folder)",
    "ours-single": "nanodiffusion load_sd(single .safetensors)",
    "ours-single-bf16": "nanodiffusion load_sd(single .safetensors, dtype=bf16) [load only]",
    "diffusers": "diffusers/transformers from_pretrained(folder)",
}


def memory() -> dict[str, float]:
    """Peak RSS (VmHWM) and private memory (RssAnon) in GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "RssAnon"):
            fields[name] = int(value.split()[0]) / 2**20
    return fields


def reset_peak() -> dict[str, float]:
    Path("/proc/self/clear_refs").write_text("5")
    return memory()


def _inputs(latent_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49406, (1, 77), generator=generator)
    ids[0, 0], ids[0, 12:] = 49406, 49407                  # BOS, 11 words, EOS and EOS padding
    return {"x": torch.randn(1, 4, latent_size, latent_size, generator=generator),
            "t": torch.tensor([500.0]), "context": torch.randn(1, 77, 768, generator=generator),
            "z": torch.randn(1, 4, latent_size, latent_size, generator=generator), "ids": ids}


def make(work: Path, *, tiny: bool = False) -> dict:
    """Random SD v1.5 networks (seed 0) saved as work/folder and work/model.safetensors.

    `tiny` builds the tests' tiny presets instead (same layout, seconds to build).
    """
    from nanodiffusion.nets import clip_text, sd_unet, vae
    from nanodiffusion.nets.clip_text import CLIPTextModel
    from nanodiffusion.nets.sd_unet import SDUNet
    from nanodiffusion.nets.vae import AutoencoderKL
    if tiny:
        unet_config, vae_config, text_config = sd_unet.TINY_UNET, vae.TINY_VAE, clip_text.TINY_TEXT
    else:
        unet_config, vae_config, text_config = sd_unet.SD15_UNET, vae.SD15_VAE, clip_text.SD15_TEXT
    from nanodiffusion.tokenizer import CLIP_BPE_FOLDER, CLIPTokenizer
    from nanodiffusion.weights import SDComponents, save_diffusers, save_single_file

    for name in ("vocab.json", "merges.txt"):
        (work / name).write_bytes(gzip.decompress((CLIP_BPE_FOLDER / f"{name}.gz").read_bytes()))
    torch.manual_seed(0)
    start = time.perf_counter()
    components = SDComponents(unet=SDUNet(unet_config).eval(), vae=AutoencoderKL(vae_config).eval(),
                              text_encoder=CLIPTextModel(text_config).eval(),
                              tokenizer=CLIPTokenizer.from_files(work / "vocab.json", work / "merges.txt"))
    built = time.perf_counter()
    save_diffusers(components, work / "folder")
    saved_folder = time.perf_counter()
    save_single_file(components, work / "model.safetensors")
    return {"build_s": built - start, "save_folder_s": saved_folder - built,
            "save_single_s": time.perf_counter() - saved_folder,
            "file_gib": (work / "model.safetensors").stat().st_size / 2**30}


def _load(mode: str, work: Path):
    """(unet, vae decode function, text function) for `mode`."""
    if mode.startswith("ours"):
        from nanodiffusion.weights import load_sd
        source = work / "folder" if mode == "ours-folder" else work / "model.safetensors"
        components = load_sd(source, dtype=torch.bfloat16 if mode.endswith("bf16") else torch.float32)
        return (components.unet, components.vae.decode,
                lambda ids: components.text_encoder(ids).hidden_states)
    import diffusers
    import transformers
    unet = diffusers.UNet2DConditionModel.from_pretrained(work / "folder", subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(work / "folder", subfolder="vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(work / "folder", subfolder="text_encoder").eval()
    return (lambda x, t, context: unet(x, t, context).sample, lambda z: vae.decode(z).sample,
            lambda ids: text(ids)[0])


def child(mode: str, work: Path, latent_size: int) -> dict:
    """Load in this (fresh) process; record time and memory, then the outputs on the shared inputs."""
    import diffusers  # noqa: F401  (imported before measuring, so the import is not counted as loading)
    import transformers  # noqa: F401

    import nanodiffusion.weights  # noqa: F401
    before = reset_peak()
    start = time.perf_counter()
    unet, decode, encode = _load(mode, work)
    elapsed = time.perf_counter() - start
    after = memory()
    result = {"load_s": elapsed, "peak_gib": after["VmHWM"] - before["VmHWM"],
              "private_gib": after["RssAnon"] - before["RssAnon"]}
    if not mode.endswith("bf16"):
        inputs = _inputs(latent_size)
        with torch.no_grad():
            start = time.perf_counter()
            outputs = {"eps": unet(inputs["x"], inputs["t"], inputs["context"]), "image": decode(inputs["z"]),
                       "text": encode(inputs["ids"])}
        result["forward_s"] = time.perf_counter() - start
        torch.save(outputs, work / f"outputs-{mode}.pt")
    return result


def _run_child(args, *extra) -> dict:
    command = [sys.executable, __file__, "--work", str(args.work), "--latent-size", str(args.latent_size),
               *extra]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(args) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), latent {args.latent_size}x"
          f"{args.latent_size} (image {8 * args.latent_size}px)")
    made = _run_child(args, "--child", "make")
    print(f"built SD v1.5 networks in {made['build_s']:.1f} s; wrote the folder in "
          f"{made['save_folder_s']:.1f} s and the single file ({made['file_gib']:.2f} GiB) in "
          f"{made['save_single_s']:.1f} s")
    print(f"\n{'load':<18} {'time s':>7} {'peak RSS GiB':>13} {'private GiB':>12} {'forward s':>10}  what")
    for mode, what in MODES.items():
        result = _run_child(args, "--child", mode)
        forward = f"{result['forward_s']:10.1f}" if "forward_s" in result else f"{'-':>10}"
        print(f"{mode:<18} {result['load_s']:7.2f} {result['peak_gib']:13.2f} {result['private_gib']:12.2f} "
              f"{forward}  {what}")
    reference = torch.load(args.work / "outputs-ours-folder.pt")
    shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in reference.items())
    print(f"\nmax-abs difference to ours-folder ({shapes})")
    for mode in MODES:
        path = args.work / f"outputs-{mode}.pt"
        if mode != "ours-folder" and path.exists():
            outputs = torch.load(path)
            diffs = "  ".join(f"{name} {(outputs[name] - reference[name]).abs().max().item():.2e}"
                              for name in reference)
            print(f"  {mode:<16} {diffs}")


@contextlib.contextmanager
def work_folder(work: Path | None, prefix: str) -> Iterator[Path]:
    """`work`, created if needed and kept; or, when None, a temporary folder removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    temporary = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent-size", type=int, default=16, help="latent side (image side is 8x)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--child", choices=["make", *MODES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = make(args.work) if args.child == "make" else child(args.child, args.work, args.latent_size)
        print(json.dumps(result))
        return
    with work_folder(args.work, "sd15_weights_") as args.work:
        report(args)


if __name__ == "__main__":
    main()
