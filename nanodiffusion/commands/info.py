"""Print the generation parameters stored in PNG files: A1111's `parameters` text, then our exact settings."""

import json

from nanodiffusion.errors import UserError
from nanodiffusion.images import read_png_text
from nanodiffusion.pipelines.metadata import PARAMETERS_KEY, SETTINGS_KEY, read_settings


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG files")
    p.add_argument("--json", action="store_true", help="print only the nanodiffusion settings, as JSON")


def run(args) -> None:
    for number, path in enumerate(args.images):
        text = read_png_text(path)
        if PARAMETERS_KEY not in text and SETTINGS_KEY not in text:
            raise UserError(f"{path} holds no generation parameters")
        if len(args.images) > 1:
            print(f"{'' if number == 0 else chr(10)}== {path}")
        if args.json:
            print(json.dumps(read_settings(text, path), indent=2, ensure_ascii=False))
            continue
        if PARAMETERS_KEY in text:
            print(text[PARAMETERS_KEY])
        if SETTINGS_KEY in text:
            print(f"{SETTINGS_KEY}: {text[SETTINGS_KEY]}")
