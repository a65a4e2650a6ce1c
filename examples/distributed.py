"""LoRA under DDP or FSDP2 on CPU: two processes (gloo) train one adapter on halves of each batch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 examples/distributed.py [--fsdp] [--out DIR]

DDP all-reduces only the adapters' gradients (the frozen base needs none). FSDP2 shards the base and the
adapters per block (fp32 adapters beside a bf16 base, computed in bf16); ``save_adapter`` is called on
every rank, gathers whole tensors and writes from rank 0.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import peftlite


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)) for _ in range(3))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("out/distributed"))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    if args.fsdp:
        model = model.to(torch.bfloat16)
    peftlite.inject(model, rank=8)  # the same adapters on every rank (same seed)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        trained = fully_shard(model, mp_policy=policy)
    else:
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))  # one fixed batch: the loss must fall
    target = torch.randn(64, 10, generator=torch.Generator().manual_seed(2)) / 8
    mine = x.chunk(world)[rank]
    for step in range(args.steps):
        prediction = trained(mine.to(next(model.parameters()).dtype)).float()
        loss = (prediction - mine @ target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and step % 5 == 4:
            print(f"step {step}: loss {loss.item():.4f}")
    peftlite.save_adapter(model if args.fsdp else trained, args.out)  # FSDP2: every rank; DDP: any
    if rank == 0:
        print(f"adapter saved to {args.out} ({'FSDP2' if args.fsdp else 'DDP'}, {world} processes)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
