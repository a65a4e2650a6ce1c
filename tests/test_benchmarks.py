"""The benchmark scripts run end to end (tiny sizes, one round) and write the JSON they promise.

Timings at these sizes mean nothing; this only keeps the scripts working as the library changes.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {
    "bench_lora_layer.py": ["--m", "24", "--k", "16", "--n", "12", "--ranks", "4", "--decode", "1"],
    "bench_model.py": ["--hidden", "32", "--layers", "1", "--heads", "2", "--vocab", "64", "--batch", "1", "--seq", "8",
                       "--rank", "2", "--prefix", "2", "--no-peak-rss"],
    "bench_merge.py": ["--cycles", "3", "--size", "16", "--rank", "2"],
    "bench_dropout.py": ["--shapes", "24x16"],
    "bench_kinds.py": ["--hidden", "64", "--layers", "1", "--seq", "16", "--vocab", "64", "--width", "4", "--images", "2",
                       "--rank", "2"],
    "bench_multi_adapter.py": ["--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "64", "--batch", "8",
                               "--seq", "8", "--context", "8", "--adapters", "3", "--rank", "2"],
}


@pytest.mark.parametrize("script", list(TINY))
def test_benchmark_runs_and_writes_rows(script, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "result.json"
    timing = [] if script == "bench_merge.py" else ["--rounds", "1", "--warmup", "0"]
    subprocess.run([sys.executable, str(BENCHMARKS / script), *TINY[script], *timing, "--out", str(out)],
                   check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["meta"]["commit"] and result["meta"]["versions"]["torch"]
    assert result["rows"] and all("contender" in row for row in result["rows"])


def test_training_benchmark_runs_and_writes_rows(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_training.py"), "--hidden", "128", "--layers", "1", "--vocab",
                    "64", "--seq", "16", "--steps", "2", "--warmup", "1", "--rounds", "1", "--rank", "2", "--out",
                    str(out), "--launch-timeout", "60"], check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    ddp = next(row for row in rows if row["contender"] == "2 processes (DDP, gloo)")
    assert 0 < ddp["allreduce_bytes_per_step"] < ddp["model_gradient_bytes"] and ddp["ratio_vs_apart"] > 0
    assert any(row["contender"] == "2 processes apart (no DDP)" for row in rows)
    for mode in ("trainer checkpoint", "dpo step"):
        assert {row["contender"] for row in rows if row["mode"] == mode} == {"peftlite", "peft"}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_checkpoint_merge_benchmark_runs_and_writes_rows(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "bench_merge.py"), "--checkpoint", "--hidden", "128", "--layers",
                    "1", "--vocab", "64", "--rank", "2", "--rounds", "1", "--out", str(out)], check=True,
                   capture_output=True, text=True)
    rows = json.loads(out.read_text())["rows"]
    assert {row["contender"] for row in rows} == {"peftlite merge", "peft merge_and_unload", "peftlite extract"}
    assert all(row["seconds"] > 0 and row["peak_rise_bytes"] >= 0 for row in rows)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_model_peak_memory_child_reports_bytes():
    pytest.importorskip("peft")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_model.py"), *TINY["bench_model.py"],
                           "--rss-of", "peftlite lora"], check=True, capture_output=True, text=True)
    peak = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
    assert isinstance(peak, int) and peak >= 0
