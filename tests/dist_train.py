"""Run by tests/test_training_stacks.py under ``torch.distributed.run`` (gloo, CPU): trains TinyMLP with LoRA
under DDP or FSDP2 on this rank's half of each batch and saves the adapter.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_train.py ddp|fsdp DTYPE OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import peftlite  # noqa: E402
from peftlite import PeftliteError  # noqa: E402
from tests.models import TinyMLP  # noqa: E402

BATCHES = [torch.randn(8, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def main(mode: str, dtype: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP().to(dtype), rank=3)  # fp32 adapters beside a 16-bit base
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for name in ("fc1", "fc2", "head"):  # per block, then the root
            fully_shard(model.get_submodule(name), mp_policy=policy)
        wrapped = fully_shard(model, mp_policy=policy)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    for x in BATCHES:
        wrapped(x.to(dtype).chunk(world)[rank]).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    if mode == "ddp":
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        if rank == 0:
            peftlite.save_adapter(wrapped, out)
    else:
        peftlite.save_adapter(model, out)  # every rank gathers; rank 0 writes
        try:
            peftlite.merge(model)
            raise AssertionError("merge of a sharded model did not raise")
        except PeftliteError as err:
            assert "sharded (FSDP2) model" in str(err)
        peftlite.load_adapter(model, out)  # into the sharded model: each rank takes its shard back
    dist.barrier()
    dist.destroy_process_group()


def single_process(dtype) -> nn.Module:
    """The reference: one process on the whole batches."""
    torch.manual_seed(0)
    model = peftlite.inject(TinyMLP().to(dtype), rank=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for x in BATCHES:
        model(x.to(dtype)).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


if __name__ == "__main__":
    main(*sys.argv[1:4])
