"""Data-parallel training over processes started by torchrun (DistributedDataParallel, Li et al. 2020).

Every rank holds the same generator, so every rank draws the same global batch and the same random numbers
for it, and keeps its own contiguous slice of them: N processes compute what one process computes on the
whole batch. DDP averages the gradients of the ranks; a trainer scales each rank's mean loss by
len(slice) · N / len(batch), so that this average is the gradient of the mean loss over the global batch.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from nanodiffusion.errors import UserError
from nanodiffusion.validation import resolve_device


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0, the one that writes checkpoints, logs and progress bars (and outside torchrun)."""
    return world()[0] == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1): gloo for CPU
    training, nccl for CUDA. Return whether this is a distributed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed: run a single process")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: str) -> torch.device:
    """The device this rank trains on: "cuda" means cuda:LOCAL_RANK in a distributed run."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batch_size: int) -> slice:
    """This rank's contiguous part of a global batch of `batch_size` items (sizes differ by at most one)."""
    rank, size = world()
    return slice(rank * batch_size // size, (rank + 1) * batch_size // size)


def parallel(module: torch.nn.Module) -> torch.nn.Module:
    """`module` wrapped in DistributedDataParallel in a distributed run, else `module` itself.

    DDP copies rank 0's weights to every rank and averages gradients in backward; call the returned
    module for the forward passes that are trained, and keep `module` for checkpoints and EMA.
    """
    if world()[1] == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `values` (a new tensor; `values` itself outside a distributed run)."""
    if world()[1] == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def all_gather_objects(value) -> list:
    """[value of rank 0, value of rank 1, ...]: picklable objects from every rank, on every rank."""
    size = world()[1]
    if size == 1:
        return [value]
    values = [None] * size
    dist.all_gather_object(values, value)
    return values


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (b, ...) tensor into (size·b, ...), passing gradients back to their owners.

    Each rank computes the same loss on the gathered tensor; the gradient of a rank's own rows is summed over
    ranks, so that DDP's average of the parameter gradients is the gradient of that one loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world()[1])]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = world()[0]
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order, differentiable (`x` outside a distributed run).

    All ranks must pass the same number of rows.
    """
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)

