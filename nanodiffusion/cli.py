"""The `nanodiffusion` command line: one sub-command module per command under nanodiffusion.commands."""

import argparse
import importlib
import sys

from nanodiffusion import __version__
from nanodiffusion.commands.train import DEFAULT_STAGE
from nanodiffusion.errors import UserError

COMMANDS = {            # name -> module in nanodiffusion.commands providing `add_arguments(parser)` and `run(args)`
    "train": "train",
    "sample": "sample",
    "export": "export",
    "forward": "forward",
    "convert": "convert",
    "eval": "eval",
    "generate": "generate",
    "info": "info",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanodiffusion",
                                     description="Train and sample diffusion models, from DDPM to Stable Diffusion.")
    parser.add_argument("--version", action="version", version=f"nanodiffusion {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"nanodiffusion.commands.{module_name}")
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def with_default_stage(argv: list[str]) -> list[str]:
    """`train` followed by an option or by nothing means `train ddpm` (the command line before stages)."""
    first_option = len(argv) > 1 and argv[1].startswith("-") and argv[1] not in ("-h", "--help")
    if argv[:1] == ["train"] and (len(argv) == 1 or first_option):
        return ["train", DEFAULT_STAGE, *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print `error: ...` and exit with status 2, never a stack trace."""
    args = build_parser().parse_args(with_default_stage(list(sys.argv[1:] if argv is None else argv)))
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
