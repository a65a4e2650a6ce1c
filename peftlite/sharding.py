"""Models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors.

Saving gathers each adapter tensor whole (a collective: every rank calls ``save_adapter``) and
rank 0 writes; loading into held adapters scatters the file's values to each rank's shard. What
needs whole weights in one place (merging, adding adapters to a sharded module) is refused with
what to do instead.
"""

import sys

import torch
from torch import nn

from .errors import PeftliteError


def dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (gathered from every rank: a collective), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` for plain and sharded parameters (each rank keeps its shard of ``value``)."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def sharded_model(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def refuse_sharded(model: nn.Module, action: str, fix: str) -> None:
    if sharded_model(model):
        raise PeftliteError(f"{action} on a sharded (FSDP2) model: its weights are split across ranks, so it "
                            f"cannot be done in place. {fix}")


def writes_here(model: nn.Module) -> bool:
    """Whether this process writes a save of ``model``: always, except rank != 0 of a sharded model."""
    if not sharded_model(model):
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def wait_for_rank_0(model: nn.Module) -> None:
    """On a sharded model, every rank returns from a save once rank 0 has written it."""
    if sharded_model(model):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
