"""Models sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors.

Saving gathers each adapter tensor whole (a collective: every rank calls ``save_adapter``) and
rank 0 writes; loading into held adapters scatters the file's values to each rank's shard. What
needs whole weights in one place (merging, adding adapters to a sharded module) is refused with
what to do instead. Inside :func:`given_values`, a save takes the tensors from a state dict given to
it instead (``save_pretrained(state_dict=...)``), and the one rank that calls it writes alone
(transformers' Trainer under FSDP gathers the model's state dict on every rank, then calls
``save_pretrained`` on rank 0 with it).
"""

import contextlib
import contextvars
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


GIVEN = contextvars.ContextVar("peftlite_given_values", default=None)  # {id(parameter or buffer): value}


@contextlib.contextmanager
def given_values(model: nn.Module, state_dict: dict):
    """Inside the block, :func:`whole` of a parameter or buffer of ``model`` is its value in ``state_dict``
    (full tensors, keyed as ``model.state_dict()``) where it has one, and saves write from this rank alone."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    token = GIVEN.set({id(t): state_dict[name] for name, t in tensors.items() if name in state_dict})
    try:
        yield
    finally:
        GIVEN.reset(token)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full value of a parameter or buffer: given (see :func:`given_values`), gathered from every rank
    for a DTensor (a collective), or the tensor itself. Pass the parameter itself, not a detached copy."""
    given = GIVEN.get()
    if given is not None and id(tensor) in given:
        return checked_value(given[id(tensor)], tensor)
    if not is_sharded(tensor):
        return tensor.detach()
    if given is not None:
        raise PeftliteError(f"save: the state dict handed to save_pretrained lacks a sharded tensor of shape "
                            f"{tuple(tensor.shape)} that the adapter holds; pass the model's full state dict "
                            "(e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                            "full_state_dict=True), or call save_adapter on every rank instead.")
    return tensor.full_tensor().detach()


def checked_value(value, tensor: torch.Tensor) -> torch.Tensor:
    """A given value must be whole: a plain tensor of the parameter's shape (of any shape where this
    process holds none of it: an empty, partitioned parameter)."""
    if not isinstance(value, torch.Tensor) or is_sharded(value) or \
            (tensor.numel() and tuple(value.shape) != tuple(tensor.shape)):
        raise PeftliteError(f"save: the state dict handed to save_pretrained holds "
                            f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))} for a parameter of shape "
                            f"{tuple(tensor.shape)}; expected the whole tensor (a full state dict).")
    return value.detach()


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
    if not sharded_model(model) or GIVEN.get() is not None:
        return True
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def wait_for_rank_0(model: nn.Module) -> None:
    """On a sharded model, every rank returns from a save once rank 0 has written it (a save from given
    values is this rank's alone: no barrier)."""
    if sharded_model(model) and GIVEN.get() is None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
