"""JSON round trips for the frozen config dataclasses (tuples become lists and back).

A config class inherits `JSONConfig` for its `to_dict` / `from_dict`; the functions serve any dataclass.
"""

import dataclasses
from collections.abc import Mapping

from nanodiffusion.errors import UserError


def config_to_dict(config) -> dict:
    """JSON-safe dict of a config dataclass's fields (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(cls, data: Mapping):
    """Inverse of `config_to_dict`; unknown keys are an error naming the valid ones, missing ones take the
    defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class JSONConfig:
    """`to_dict` / `from_dict` for a frozen config dataclass (see the module's functions)."""

    def to_dict(self) -> dict:
        """JSON-safe dict of the fields (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping):
        """Inverse of `to_dict`; unknown keys are a UserError, missing ones take the defaults."""
        return config_from_dict(cls, data)
