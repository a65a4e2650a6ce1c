"""The Triton kernels compiled for an H100 (sm_90) as peftlite launches them, without a GPU.

Triton's compiler and the ptxas/cuobjdump it ships work offline: for every kernel, dtype, rank and
specialization this reports registers per thread, spilled (stack) bytes, shared memory and whether
the loads were pipelined (asynchronous copies). "aligned" is the specialization Triton picks when
pointers are 16-byte aligned and M, N, K and the strides are multiples of 16 (the usual case and the
reference shapes); odd shapes get the unaligned one. No runtime speed is measured here.

    python benchmarks/triton_sm90.py              # table + benchmarks/results/triton-sm90.json
    python benchmarks/triton_sm90.py --out -      # JSON on stdout (tests/test_triton_sm90.py)
"""

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile the real kernels, not the interpreter's (read at import)

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.backends.nvidia as nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from peftlite.ops import triton_lora  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
KERNELS = {  # name in triton_lora.CUDA_TILES -> (kernel, its boolean flags)
    "forward": (triton_lora._forward_kernel, ("HAS_BIAS",)),
    "decode": (triton_lora._decode_kernel, ("HAS_BIAS", "DROPOUT")),
    "t": (triton_lora._t_kernel, ("DROPOUT",)),
    "dx": (triton_lora._dx_kernel, ("DROPOUT",)),
    "da": (triton_lora._da_kernel, ("DROPOUT",)),
}
POINTER = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
FLOATS = ("scale", "p")
ALIGNABLE = re.compile(r"_ptr$|^stride|^[MNK]$")  # arguments Triton specializes as divisible by 16


def compile_for_h100(name: str, dtype: str, rank: int, flags: bool, aligned: bool):
    """Compile kernel ``name`` with the settings ``triton_lora`` launches it with on CUDA."""
    kernel, flag_names = KERNELS[name]
    settings = triton_lora.config(name, getattr(torch, dtype), rank, torch.device("cuda"))
    warps = settings.pop("num_warps")
    constants = {**settings, **triton_lora.precision(getattr(torch, dtype), torch.device("cuda")),
                 **{flag: flags for flag in flag_names}}
    signature = {arg: "constexpr" if arg in constants else POINTER[dtype] if arg.endswith("_ptr")
                 else "fp32" if arg in FLOATS else "i32" for arg in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if aligned and ALIGNABLE.search(arg)}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=H100, options={"num_warps": warps}), settings, warps


def resources(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack (spill) bytes, as cuobjdump reads them from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name], capture_output=True,
                                text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", report))
    return {"registers": int(found["REG"]), "stack_bytes": int(found["STACK"])}


def report_row(name: str, dtype: str, rank: int, flags: bool, aligned: bool) -> dict:
    row = {"kernel": name, "dtype": dtype, "rank": rank, "flags": flags, "aligned": aligned}
    try:
        compiled, tiles, warps = compile_for_h100(name, dtype, rank, flags, aligned)
    except Exception as error:  # a kernel that does not compile is the finding, reported per row
        return {**row, "error": f"{type(error).__name__}: {error}"[:2000]}
    return {**row, "tiles": tiles, "num_warps": warps, **resources(compiled.asm["cubin"]),
            "shared_bytes": compiled.metadata.shared, "pipelined": "async_copy" in compiled.asm["ttgir"]}


def rows() -> list[dict]:
    """Flags on (the most registers) for ranks 16 and 64, aligned and not; flags off compiled too."""
    cases = [(n, d, r, True, a) for n, d, r, a in itertools.product(KERNELS, POINTER, (16, 64), (True, False))]
    cases += [(n, d, 16, False, a) for n, d, a in itertools.product(KERNELS, POINTER, (True, False))]
    return [report_row(*case) for case in cases]


def print_table(found: list[dict]) -> None:
    print(f"{'kernel':<8} {'dtype':<9} {'r':>3} {'flags':<5} {'aligned':<7} {'warps':>5} {'regs':>4} {'spill B':>7} "
          f"{'smem KiB':>8} pipelined")
    for r in found:
        if "error" in r:
            print(f"{r['kernel']:<8} {r['dtype']:<9} {r['rank']:>3} {r['flags']!s:<5} {r['aligned']!s:<7} ERROR "
                  f"{r['error'].splitlines()[0]}")
            continue
        print(f"{r['kernel']:<8} {r['dtype']:<9} {r['rank']:>3} {r['flags']!s:<5} {r['aligned']!s:<7} "
              f"{r['num_warps']:>5} {r['registers']:>4} {r['stack_bytes']:>7} {r['shared_bytes'] / 1024:>8.1f} "
              f"{r['pipelined']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "triton-sm90.json"),
                        help="JSON path, or - for standard output")
    args = parser.parse_args()
    found = rows()
    result = {"meta": common.metadata(benchmark="triton_sm90", target="cuda sm_90 (compiled on the host above)"),
              "rows": found}
    if args.out == "-":
        json.dump(result, sys.stdout)
        return
    print_table(found)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
