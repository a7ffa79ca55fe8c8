"""Convert Stable Diffusion v1.x weights between a diffusers folder and the original single file.

The layout of DST follows its name: a path ending in .safetensors or .ckpt is a single file, anything else a
diffusers folder. A single file holds no tokenizer: an SD v1.x one gets CLIP's (shipped with the package),
others need --tokenizer to become a folder.
"""

from pathlib import Path

from nanodiffusion.atomic import check_output_file, check_output_folder
from nanodiffusion.errors import UserError
from nanodiffusion.tokenizer import CLIPTokenizer
from nanodiffusion.weights import load_sd, save_diffusers, save_single_file
from nanodiffusion.weights.components import DTYPES

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def add_arguments(p) -> None:
    p.add_argument("src", help="diffusers folder, .safetensors or .ckpt file, Hugging Face repo id, or "
                               "`builtin` (the built-in text-to-image model)")
    p.add_argument("dst", help="output: a folder (diffusers) or a .safetensors / .ckpt file (single file)")
    p.add_argument("--to", choices=["diffusers", "single-file"],
                   help="output layout; default: from DST's name (must agree with it when given)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights")
    p.add_argument("--variant", help="read the *.VARIANT.safetensors files of a diffusers folder (e.g. fp16)")
    p.add_argument("--tokenizer", help="tokenizer folder to put in a diffusers folder made from a single file "
                                       "(default for SD v1.x files: CLIP's, shipped with the package)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading a pickle .ckpt (weights-only unpickling); prefer .safetensors")


def run(args) -> None:
    dst = Path(args.dst)
    layout = "single-file" if dst.suffix in SINGLE_FILE_SUFFIXES else "diffusers"
    if args.to and args.to != layout:
        raise UserError(f"--to {args.to} disagrees with DST {dst}: a single file must end with "
                        f"{' or '.join(SINGLE_FILE_SUFFIXES)}, a diffusers folder must not")
    check_output = check_output_folder if layout == "diffusers" else check_output_file
    check_output(dst, "DST")
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else None
    components = load_sd(args.src, dtype=args.dtype, variant=args.variant, trust_pickle=args.trust_pickle,
                         tokenizer=tokenizer)
    check_output(dst, "DST", size=sum(tensor.numel() * tensor.element_size()
                                      for network in components.networks().values()
                                      for tensor in network.state_dict().values()))
    if layout == "diffusers":
        save_diffusers(components, dst)
    else:
        save_single_file(components, dst)
    print(f"wrote {dst} ({layout}, {args.dtype})")
