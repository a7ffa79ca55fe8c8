"""JSON round trips for the frozen config dataclasses (tuples become lists and back)."""

import dataclasses

from nanodiffusion.errors import UserError


def config_to_dict(config) -> dict:
    """JSON-safe dict of a config dataclass's fields (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls, data: dict):
    """Inverse of `config_to_dict`; unknown keys are an error, missing ones take the defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys {unknown}; valid: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
