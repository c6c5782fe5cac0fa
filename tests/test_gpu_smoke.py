"""benchmarks/gpu.py --smoke: the whole GPU comparison runs on a CPU (a 2-layer Qwen3-shaped model, 5 steps).

Every row a CPU can run trains through benchmarks/step_probe.py (steady window, a profiled step); the
GPU-only rows are listed with their reason there, and run on a GPU host (where the sync check applies too).
Needs the Qwen3 tokenizer and bench_2k from ../shared.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from tests.conftest import SHARED, run_script, shared_path

VOCAB = 151936  # Qwen3's: a random-init model's loss starts at ln(VOCAB)
ZERO3 = "ours --deepspeed zero3 (1 process), batch 2"  # runs where deepspeed is installed (one CPU process)
RAN = ("ours, batch 2", "ours --packing False, batch 2", "reference-grouped, batch 2", "reference, batch 2") + \
    ((ZERO3,) if importlib.util.find_spec("deepspeed") else ())
GPU_ONLY = ("ours --use_liger_kernel, batch 2", "ours QLoRA (4-bit NF4), batch 2")
COMPILE = "ours --torch_compile, batch 2"  # skipped by the smoke: compiling alone outlasts it
CUDA = torch.cuda.is_available()


@pytest.mark.slow
def test_gpu_benchmark_smoke_on_cpu(tmp_path) -> None:
    shared_path("models", "qwen3-tokenizer")
    shared_path("bench", "bench_2k.json")
    run_script("benchmarks/gpu.py", "--smoke", "--out", str(tmp_path), "--report_dir", str(tmp_path / "report"),
               env={"ALPACA_COT_SHARED": SHARED}, timeout=900)
    results = json.loads((tmp_path / "gpu_results.json").read_text(encoding="utf-8"))
    rows = {r["name"]: r for r in results["rows"]}
    assert set(RAN) | set(GPU_ONLY) | {ZERO3, COMPILE} <= set(rows)
    for name in RAN:
        row = rows[name]
        assert not row["error"] and not row["skipped"], name
        assert row["steps"] == results["steps"] == 5 and not row["not_reached"], name
        assert row["steady_tokens_per_s"] > 0 and 0 < row["mfu"] < 1, name
        # 5 steps barely move LoRA: a loss over the wrong tokens or wrongly normalised would be far off
        assert abs(row["train_loss"] - math.log(VOCAB)) < 0.05, (name, row["train_loss"])
        assert name == ZERO3 or row["profile"]["wall_ms"] > 0, name  # the ZeRO-3 run is not profiled
    assert rows["ours, batch 2"]["padding"] == 0 < rows["ours --packing False, batch 2"]["padding"]
    for name in GPU_ONLY:  # on a GPU host they run, unless their package is not installed there
        skipped = rows[name]["skipped"]
        assert not rows[name]["error"], name
        assert ("not installed" in skipped or not skipped) if CUDA else skipped == "needs a CUDA GPU", name
    assert rows[COMPILE]["skipped"].startswith("smoke:")
    profiles = (tmp_path / "profiles.txt").read_text(encoding="utf-8")
    assert all(f"=== {name}" in profiles for name in RAN if name != ZERO3) and "aten::mm" in profiles
    table = (tmp_path / "gpu_results.md").read_text(encoding="utf-8")
    assert f"transformers {results['versions']['transformers']}" in table and "commit " in table
    assert all(f"| {name} |" in table for name in rows)
    report = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert report == ["gpu_results.json", "gpu_results.md", "logs.txt", "profiles.txt"]


def test_the_sync_check_fails_on_our_rows_syncs_outside_the_known_sites() -> None:
    # The decision alone (a sync needs a GPU): sites as benchmarks/step_probe.py records them.
    import benchmarks.gpu as gpu

    def entry(name: str, sites: dict[str, int], log_syncs: int = 0, reference: bool = False) -> dict:
        window = {"checked": True, "from_step": 38, "to_step": 40, "syncs": sum(sites.values()),
                  "sites": [{"count": n, "stack": [f"/x/{site}.py:1 {site}"]} for site, n in sites.items()]}
        return {"name": name, "reference": reference, "unknown_syncs_per_step": gpu.unknown_syncs(window, log_syncs)}

    padded = entry("ours --packing False, batch 8", {"_ignore_causal_mask_sdpa": 2})
    assert padded["unknown_syncs_per_step"] == 0 and not gpu.sync_failures([padded])
    ours = entry("ours, batch 8", {"find_packed_sequence_indices": 4}, log_syncs=2)
    reference = entry("reference, batch 8", {"item": 6}, reference=True)
    assert gpu.sync_failures([ours, reference, padded]) == ["ours, batch 8 (3/step)"]
    unchecked = {"name": "ours, batch 2", "reference": False, "unknown_syncs_per_step": gpu.unknown_syncs({}, 0)}
    assert not gpu.sync_failures([unchecked])
