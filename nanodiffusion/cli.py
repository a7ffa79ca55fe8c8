"""The `nanodiffusion` command line: one sub-command module per command under nanodiffusion.commands.

Only the command being run is imported (with torch and the rest), so `nanodiffusion --help` is quick.
"""

import argparse
import sys

from nanodiffusion import __version__
from nanodiffusion.commands import add_commands
from nanodiffusion.errors import UserError

# name -> (module in nanodiffusion.commands with `add_arguments(parser)` and `run(args)`, one-line help)
COMMANDS = {
    "train": ("train", "train a model: ddpm (default), or vae, text-encoder and unet for text-to-image"),
    "sample": ("sample", "sample images from a DDPM model (the built-in Fashion-MNIST model by default)"),
    "export": ("export", "export a DDPM training checkpoint as a model file for sampling"),
    "forward": ("forward", "picture of the forward (noising) process"),
    "convert": ("convert", "convert SD v1.x weights between a diffusers folder and a single "
                           ".safetensors/.ckpt file"),
    "eval": ("eval", "measure a DDPM model: class agreement, Fréchet distance, diversity (or a sampler x "
                     "steps sweep); or a text-to-image model's prompt adherence"),
    "generate": ("generate", "generate images from a text prompt (Stable Diffusion v1.x)"),
    "info": ("info", "print the generation parameters stored in a PNG (A1111 'parameters' and nanodiffusion "
                     "settings)"),
    "serve": ("serve", "serve a web page and AUTOMATIC1111's HTTP API for text-to-image"),
}
DEFAULT_STAGE = "ddpm"          # `nanodiffusion train --dataset ...` (no stage) trains DDPM, as it always did


def build_parser(commands: set[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `commands` (None: every command); the others are only listed."""
    parser = argparse.ArgumentParser(
        prog="nanodiffusion", description="Train and sample diffusion models, from DDPM to Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"nanodiffusion {__version__}")
    add_commands(parser, COMMANDS, dest="command", run_key="run", build=commands)
    return parser


def with_default_stage(argv: list[str]) -> list[str]:
    """`train` followed by an option or by nothing means `train ddpm` (the command line before stages)."""
    first_option = len(argv) > 1 and argv[1].startswith("-") and argv[1] not in ("-h", "--help")
    if argv[:1] == ["train"] and (len(argv) == 1 or first_option):
        return ["train", DEFAULT_STAGE, *argv[1:]]
    return argv


OUT_OF_MEMORY = "out of memory: ask for fewer or smaller images (or a smaller batch)"


def _is_allocation_failure(error: RuntimeError) -> bool:
    """True for torch's out-of-memory errors: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError."""
    return type(error).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(error)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print `error: ...` and exit with status 2, never a stack trace."""
    argv = with_default_stage(list(sys.argv[1:] if argv is None else argv))
    # the first word that is not an option names the command (no top-level option takes a value)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser({command}).parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                # the machine's side: a file or disk that fails under us
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except MemoryError:
        print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:           # torch's allocators fail with RuntimeErrors, not MemoryError
        if not _is_allocation_failure(e):
            raise
        print(f"error: {OUT_OF_MEMORY} ({str(e).splitlines()[0][:200]})", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
