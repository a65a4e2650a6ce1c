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
        save_as_transformers_does(model, out, rank)
        try:
            peftlite.merge(model)
            raise AssertionError("merge of a sharded model did not raise")
        except PeftliteError as err:
            assert "sharded (FSDP2) model" in str(err)
        peftlite.load_adapter(model, out)  # into the sharded model: each rank takes its shard back
    dist.barrier()
    dist.destroy_process_group()


def save_as_transformers_does(model: nn.Module, out: str, rank: int) -> None:
    """``save_pretrained`` of an injected transformers model on a sharded model, both ways it is called:
    by the Trainer under FSDP (the full state dict gathered on every rank, then rank 0 alone saves with
    it) and by a script on every rank with ``is_main_process``. Neither may hang or write a shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from peftlite.hf import AdapterSave

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        AdapterSave(model)(f"{out}-given", state_dict=full, is_main_process=True)
        try:  # a state dict without the adapter (a sharded or partial one): refused, nothing written
            AdapterSave(model)(f"{out}-partial", state_dict={}, is_main_process=True)
            raise AssertionError("a save from an empty state dict did not raise")
        except PeftliteError as err:
            assert "lacks a sharded tensor" in str(err) and not Path(f"{out}-partial").exists()
    dist.barrier()
    AdapterSave(model)(f"{out}-every", is_main_process=rank == 0)


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
