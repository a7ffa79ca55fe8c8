"""Stopping a generation inside a network's forward pass, not only between sampler steps.

One SD step at a large size, or one VAE decode, can take minutes on a CPU; a cancel that waits for the step to
end holds the server's only worker that long. `checked(networks, check)` runs `check()` before every
convolution and linear layer of the networks (torch's forward pre-hooks, removed on exit), so a `check` that
raises stops the work within one layer, also between VAE tiles. The networks themselves know nothing of it.
"""

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch.nn as nn

# The layers that do the work: checking before each bounds the time to a stop by the slowest single layer
# (a full-resolution VAE conv), while the checks stay a few hundred cheap calls per UNet pass.
CHECKED_LAYERS = (nn.Conv2d, nn.Linear)


@contextmanager
def checked(networks: Iterable[nn.Module], check: Callable[[], None]):
    """Within the block, `check()` runs before each Conv2d and Linear layer of `networks`."""
    handles = [layer.register_forward_pre_hook(lambda module, args: check())
               for network in networks for layer in network.modules() if isinstance(layer, CHECKED_LAYERS)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
