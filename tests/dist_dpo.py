"""Run by tests/test_trl.py under ``torch.distributed.run`` (gloo, CPU): ``peftlite.trl.DPOTrainer`` on 2
processes (accelerate wraps the policy in DDP; the reference is the policy with its adapters off), each
rank on half of every batch, then ``save_model``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_dpo.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import peftlite  # noqa: E402
from tests.test_trl import dpo_run  # noqa: E402


def main(out: str) -> None:
    model, trainer = dpo_run(out, pairs_per_process=4)
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    mine = {n: p.detach() for n, p in model.named_parameters() if "lora" in n}
    theirs = [None] * dist.get_world_size()
    dist.all_gather_object(theirs, mine)
    assert all(torch.equal(other[n], value) for other in theirs for n, value in mine.items())  # one adapter
    trainer.save_model(str(Path(out) / "final"))
    assert isinstance(trainer.ref_model, peftlite.trl.BaseReference)


if __name__ == "__main__":
    main(sys.argv[1])
