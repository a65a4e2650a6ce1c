"""Measured dispatch: which backend a call runs when PEFTLITE_BACKEND is unset, and the table it reads."""

import importlib.resources
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftlite
from peftlite.ops import backend, dispatch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(mode, contender, ratio, m=8192, k=4096, n=4096, rank=16, dropout=0.0, dtype="bfloat16"):
    """One row as bench_lora_layer.py writes it."""
    return {"mode": mode, "contender": contender, "m": m, "k": k, "n": n, "rank": rank, "dtype": dtype,
            "dropout": dropout, "median_ms": ratio, "ratio_vs_base": ratio, "peft_time_over_this": 1.0}


def timed(torch_ratio, triton_ratio, mode="forward+backward", **shape):
    """Both paths' rows for one shape."""
    return [row(mode, "peftlite torch", torch_ratio, **shape), row(mode, "peftlite triton", triton_ratio, **shape)]


def result(rows, arch="sm_90"):
    meta = {"device": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "date": "2026-11-23"}
    return {"meta": {**meta, "arch": arch} if arch else meta, "rows": rows}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Install a table written by benchmarks/dispatch_table.py from ``rows``; returns the installer."""
    script = load_script("dispatch_table")

    def install(rows, arch="sm_90"):
        path = tmp_path / "dispatch.json"
        empty = {"about": "test", "entries": []}
        path.write_text(json.dumps(script.merged(empty, script.entries(result(rows, arch)))))
        monkeypatch.setattr(dispatch, "table", lambda: dispatch.read_table(path))
        dispatch.decide.cache_clear()
        return json.loads(path.read_text())["entries"]
    yield install
    dispatch.decide.cache_clear()


def test_the_faster_path_of_each_measured_shape_becomes_an_entry(table):
    entries = table([
        *timed(1.10, 1.04), row("forward+backward", "peft", 1.40), *timed(1.12, 1.20, dropout=0.1),
        *timed(1.30, 1.02, mode="inference", m=1), row("inference", "peftlite torch merged", 1.00, m=1),
        row("forward", "peftlite torch", 1.0), row("forward", "peftlite triton", 2.0),  # not a dispatch mode
        row("inference", "peftlite torch", 1.0, m=16),  # triton not timed at M=16: no winner to record
    ])
    got = {(e["mode"], e["dropout"], e["m"]): (e["backend"], e["torch_x_base"], e["triton_x_base"]) for e in entries}
    assert got == {("train", False, 8192): ("triton", 1.10, 1.04), ("train", True, 8192): ("torch", 1.12, 1.20),
                   ("infer", False, 1): ("triton", 1.30, 1.02)}
    assert all(e["arch"] == "sm_90" and e["device"].startswith("NVIDIA") and e["commit"] for e in entries)


def test_a_new_run_replaces_the_entries_of_its_shapes_and_keeps_the_others():
    script = load_script("dispatch_table")
    first = script.merged({"about": "test", "entries": []}, script.entries(result(timed(1.0, 1.1, m=8192)
                                                                                   + timed(1.0, 1.1, m=1024))))
    again = script.merged(first, script.entries(result(timed(1.2, 1.0, m=8192), arch="sm_90")))
    assert [(e["m"], e["backend"]) for e in again["entries"]] == [(1024, "torch"), (8192, "triton")]
    assert again["about"] == "test"


def test_a_call_runs_the_winner_of_the_nearest_measured_shape(table):
    table(timed(1.0, 1.1, m=8192) + timed(1.1, 1.0, m=1024))
    choose = dispatch.measured_backend
    assert choose("sm_90", "bfloat16", "train", False, 8192, 4096, 4096, 16) == "torch"
    assert choose("sm_90", "bfloat16", "train", False, 16384, 4096, 4096, 16) == "torch"
    assert choose("sm_90", "bfloat16", "train", False, 1024, 4096, 4096, 16) == "triton"
    assert choose("sm_90", "bfloat16", "train", False, 512, 2048, 11008, 64) == "triton"  # nearest in M
    # groups nobody measured run torch: another GPU, dtype, mode, or dropout on
    assert choose("sm_80", "bfloat16", "train", False, 1024, 4096, 4096, 16) == "torch"
    assert choose("sm_90", "float16", "train", False, 1024, 4096, 4096, 16) == "torch"
    assert choose("sm_90", "bfloat16", "infer", False, 1024, 4096, 4096, 16) == "torch"
    assert choose("sm_90", "bfloat16", "train", True, 1024, 4096, 4096, 16) == "torch"


def test_symbolic_rows_choose_by_the_weights_shape_alone(table):
    table(timed(1.0, 1.1, m=8192, k=4096) + timed(1.1, 1.0, m=1024, k=1024))
    assert dispatch.measured_backend("sm_90", "bfloat16", "train", False, None, 1024, 4096, 16) == "triton"
    assert dispatch.measured_backend("sm_90", "bfloat16", "train", False, None, 4096, 4096, 16) == "torch"


def test_cpu_tensors_run_torch_whatever_the_table_says(table, monkeypatch):
    table(timed(2.0, 1.0, dtype="float32"))
    monkeypatch.delenv("PEFTLITE_BACKEND", raising=False)
    layer = peftlite.LoRALinear(torch.nn.Linear(4096, 4096), rank=16)
    parameters = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    assert dispatch.choose(torch.randn(8192, 4096), *parameters, 0.0) == "torch"


def test_a_table_choice_of_triton_without_triton_installed_runs_torch(table, monkeypatch):
    table(timed(1.2, 1.0))
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    dispatch.decide.cache_clear()
    assert dispatch.decide("cuda", 0, "bfloat16", True, False, 8192, 4096, 4096, 16) == "torch"


def test_compiled_calls_decide_once_without_the_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "decide", lambda *args: calls.append(args) or "torch")
    torch._dynamo.reset()
    layer = peftlite.LoRALinear(torch.nn.Linear(12, 5), rank=3)
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (7, 9, 33):
        x = torch.randn(rows, 12, requires_grad=True)
        torch.testing.assert_close(compiled(x), layer(x))
    traced = [args for args in calls if args[5] is None]  # the rows are left out while tracing
    assert traced and all(args[:5] == ("cpu", None, "float32", True, False) and args[6:] == (12, 5, 3)
                          for args in traced)
    torch._dynamo.reset()


def test_an_empty_variable_means_measured_dispatch(monkeypatch):
    monkeypatch.setenv("PEFTLITE_BACKEND", "")
    assert backend.forced() is None
    monkeypatch.setenv("PEFTLITE_BACKEND", "reference")
    assert backend.forced() == "reference"


@pytest.mark.parametrize("m, k, n, fits", [(8192, 4096, 4096, True), (2**19, 4096, 1024, False),
                                           (4096, 2**19, 1024, False), (1, 2**16, 2**15, False)])
def test_shapes_past_the_kernels_int32_offsets_are_not_sent_to_triton(m, k, n, fits):
    assert (dispatch.oversized(m, k, n) is None) is fits


def test_rows_are_bucketed_to_powers_of_two():
    assert [dispatch.rows_bucket(m) for m in (1, 2, 3, 16, 17, 8191, 8192)] == [1, 2, 4, 16, 32, 8192, 8192]


def test_the_shipped_table_is_packaged_and_well_formed():
    shipped = importlib.resources.files("peftlite.ops").joinpath("dispatch.json")
    assert shipped.is_file()
    for group, entries in dispatch.read_table(dispatch.TABLE).items():
        for entry in entries:
            assert entry.mode in ("train", "infer") and entry.backend in ("torch", "triton")
            assert entry.arch.startswith("sm_") and min(entry.m, entry.k, entry.n, entry.rank) >= 1
            assert not (entry.mode == "infer" and entry.dropout)


@pytest.mark.parametrize("change", [{"backend": "cuda"}, {"mode": "training"}, {"rank": None}])
def test_a_malformed_table_is_named(change, tmp_path):
    entry = {"arch": "sm_90", "dtype": "bfloat16", "mode": "train", "dropout": False, "m": 8192, "k": 4096,
             "n": 4096, "rank": 16, "backend": "triton"}
    entry = {key: value for key, value in {**entry, **change}.items() if value is not None}
    path = tmp_path / "dispatch.json"
    path.write_text(json.dumps({"entries": [entry]}))
    with pytest.raises(peftlite.PeftliteError, match="dispatch.json: dispatch entry .* malformed"):
        dispatch.read_table(path)


def test_cpu_results_are_refused_by_the_table_writer(tmp_path):
    pytest.importorskip("peft")
    results = tmp_path / "layer.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_lora_layer.py"), "--m", "24", "--k", "16", "--n", "12",
                    "--ranks", "4", "--decode", "--rounds", "1", "--warmup", "0", "--out", str(results)],
                   check=True, capture_output=True, text=True)
    out = tmp_path / "dispatch.json"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "dispatch_table.py"), str(results), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "no GPU architecture" in done.stderr
    assert not out.exists()


def test_the_table_writer_merges_cuda_results_into_a_table_file(tmp_path):
    results = tmp_path / "layer-cuda.json"
    results.write_text(json.dumps(result(timed(1.10, 1.04) + timed(1.30, 1.02, mode="inference", m=1))))
    out = tmp_path / "dispatch.json"
    out.write_text(json.dumps({"about": "kept", "entries": [{**timed(0, 0)[0], "arch": "sm_80", "mode": "train",
                                                             "dropout": False, "backend": "torch"}]}))
    done = subprocess.run([sys.executable, str(BENCHMARKS / "dispatch_table.py"), str(results), "--out", str(out)],
                          check=True, capture_output=True, text=True)
    assert "2 measured shapes" in done.stdout and "-> triton" in done.stdout
    table = json.loads(out.read_text())
    assert table["about"] == "kept"
    assert [(e["arch"], e["mode"], e["backend"]) for e in table["entries"]] == [
        ("sm_80", "train", "torch"), ("sm_90", "infer", "triton"), ("sm_90", "train", "triton")]
    assert {tuple(group) for group in dispatch.read_table(out)} == {("sm_80", "bfloat16", "train", False),
                                                                  ("sm_90", "bfloat16", "infer", False),
                                                                  ("sm_90", "bfloat16", "train", False)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_call_follows_the_table_for_its_architecture(table):
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    table(timed(1.2, 1.0), arch=arch)
    layer = peftlite.LoRALinear(torch.nn.Linear(4096, 4096), rank=16).cuda().bfloat16()
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    parameters = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    assert dispatch.choose(x, *parameters, 0.0) == "triton"  # lora_A and lora_B train: the train group
    with torch.no_grad():
        assert dispatch.choose(x, *parameters, 0.0) == "torch"  # infer: not measured here
