"""The Triton kernels compiled for an H100 (sm_90) with the launch settings peftlite uses, without a GPU.

The interpreter checks what the kernels compute; it cannot tell whether they compile for real hardware
or how they use it. Triton's compiler and the ptxas/cuobjdump it ships can, offline
(benchmarks/triton_sm90.py, run here in a subprocess because this process runs the interpreter).

That every kernel compiles and fits the hardware's shared memory holds for any Triton. Register
allocation (spills) and pipelining are one compiler version's choices: they are asserted only under the
Triton version that benchmarks/results/triton-sm90.json was measured with, and skipped under others
(rerun the benchmark there to see what that version does).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nvidia = pytest.importorskip("triton.backends.nvidia")

import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_sm90.py"
MEASURED = json.loads((ROOT / "benchmarks" / "results" / "triton-sm90.json").read_text())["meta"]["versions"]["triton"]
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
pytestmark = pytest.mark.skipif(not (Path(nvidia.__file__).parent / "bin" / "cuobjdump").exists(),
                                reason="triton ships no NVIDIA tools on this platform")


@pytest.fixture(scope="module")
def report() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", "-"], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout)["rows"]


def test_every_kernel_dtype_rank_and_specialization_compiles(report):
    assert len(report) == 90
    assert [r for r in report if "error" in r] == []


@pytest.mark.skipif(triton.__version__ != MEASURED, reason=f"register allocation is Triton {MEASURED}'s, measured in "
                    f"benchmarks/results/triton-sm90.json; this is Triton {triton.__version__}")
def test_aligned_launches_do_not_spill_and_pipeline_their_loads(report):
    """Aligned tensors and multiples of 16 (the usual case; the reference shapes): what the tiles were chosen for."""
    aligned = [r for r in report if r["aligned"]]
    assert len(aligned) == 45
    for r in aligned:
        case = f"{r['kernel']} {r['dtype']} rank {r['rank']} flags {r['flags']}"
        assert r["stack_bytes"] == 0, f"{case}: spills {r['stack_bytes']} bytes ({r['registers']} registers)"
        assert r["pipelined"], f"{case}: loads not pipelined"
        assert r["shared_bytes"] <= H100_SHARED_BYTES, case


def test_odd_shapes_fit_in_shared_memory(report):
    assert all(r["shared_bytes"] <= H100_SHARED_BYTES for r in report)
