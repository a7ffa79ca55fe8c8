"""Sub-commands of the nanodiffusion command line: one module per command, each with `add_arguments(parser)`
and `run(args)`. This package imports nothing heavy: `nanodiffusion --help` lists the commands without
loading torch.
"""

import argparse
import importlib


def add_commands(parser: argparse.ArgumentParser, table: dict[str, tuple[str, str]], *, dest: str,
                 run_key: str, build: set[str] | None = None) -> None:
    """Sub-parsers for `table` (name -> (module in this package, one-line help)), each module's `run` stored
    as args.`run_key`. Only the commands in `build` (None: all) import their module to add their arguments;
    the others are listed in the help alone."""
    commands = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
    for name, (module_name, help_text) in table.items():
        if build is not None and name not in build:
            commands.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"{__name__}.{module_name}")
        command = commands.add_parser(name, help=help_text, description=module.__doc__,
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(**{run_key: module.run})
