"""`make gpu-check` (bench/gpu_check.py): its arithmetic on known numbers, and its dry run.

No GPU is lent to the machines the suite runs on, so the check runs here as the dry run it
falls back to on a CPU (tiny clips, one step per setting, a real fold of 3 iterations
through train_fold), against an assumed device's datasheet peak so that every figure it
prints is computed and can be checked by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402 (bench/ is not a package)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("NVIDIA L40S", None),  # not an L4
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_names_find_their_datasheet(name, key):
    assert gpu_check.datasheet_key(name) == key


def test_peaks_fractions_and_the_extrapolation_on_known_numbers():
    # H100 SXM: 989.4 dense bf16 TFLOP/s; 1e15 FLOP in one second is 1.0107 of it.
    peak, source = gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "bf16", tf32=True)
    assert peak == 989.4 and "H100 SXM" in source and "datasheet" in source
    assert gpu_check.peak_fraction(1e15, 1.0, peak) == pytest.approx(1e15 / 989.4e12)
    assert gpu_check.peak_fraction(2.5e14, 0.5, 500.0) == pytest.approx(1.0)
    # fp32 is set against TF32 where cuDNN may use it, against plain fp32 where not.
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-40GB", "fp32", tf32=True)[0] == 156.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-40GB", "fp32", tf32=False)[0] == 19.5
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB", "fp32", tf32=True)[0] == 15.7
    assert gpu_check.peak_tflops("Tesla T4", "bf16", tf32=True) is None  # no bf16
    assert gpu_check.peak_tflops("NVIDIA L40S", "bf16", tf32=True) is None  # unknown
    # The seed's recipe: 10 folds x 10,000 iterations; 0.5 s a step is 50,000 s.
    assert gpu_check.extrapolated_seconds(0.5) == 50_000.0
    assert gpu_check.extrapolated_seconds(0.2, iterations=100, folds=2) == pytest.approx(40.0)
    assert gpu_check.hours(50_000.0) == "13.9 h"
    # Evaluations: 50 of 200 clips' forward (1 unit each) against 10,000 steps of 300
    # units at the seed's batch of 32 (counted at batch 2: 300 * 2 / 32 = 18.75).
    assert gpu_check.evaluation_share(1.0, 300.0) == pytest.approx(50 * 200 / (10_000 * 300))
    assert gpu_check.evaluation_share(1.0, 18.75, batch=2) == pytest.approx(
        50 * 200 / (10_000 * 300)
    )
    # The real fold: 0.1 s per iteration (data and steps) and 2 s per evaluation (with its
    # checkpoint) make 1,000 + 50 x 2 s a fold of the seed's, 11,000 s for ten.
    fold = {
        "iterations": 100,
        "evaluations": 2,
        "phase_seconds": {"data": 1.0, "steps": 9.0, "evaluation": 2.0, "checkpoint": 2.0},
    }
    assert gpu_check.fold_extrapolation(fold) == pytest.approx(11_000.0)


def test_dry_run_on_the_cpu_measures_every_setting_and_its_arithmetic_holds(tmp_path, capsys):
    out = tmp_path / "check.json"
    assumed = "NVIDIA H100 PCIe"
    code = gpu_check.main(
        ["--dry-run", "--steps", "1", "--assume-device", assumed, "--json", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and "DRY RUN" in printed
    assert result["clips_per_step"] == 2 * result["batch"]
    # Every setting but the compiled one (skipped on a CPU unless asked) was measured.
    assert set(result["settings"]) == {gpu_check.FP32, gpu_check.BF16, gpu_check.CHANNELS_LAST}
    assert "--compile-on-cpu" in result["skipped"][gpu_check.COMPILED]
    assert result["flops_per_step"] > result["forward_flops_per_clip"] > 0
    for setting, m in result["settings"].items():
        assert m["clips_per_second"] == pytest.approx(result["clips_per_step"] / m["step_seconds"])
        assert m["seed_recipe_seconds"] == pytest.approx(m["step_seconds"] * 10 * 10_000)
        expected_peak = 756.0 if m["precision"] == "bf16" else 51.0  # H100 PCIe, no TF32
        assert m["peak_tflops"] == expected_peak, setting
        assert m["peak_fraction"] == pytest.approx(
            result["flops_per_step"] / m["step_seconds"] / (expected_peak * 1e12)
        )
        assert f"{m['clips_per_second']:.2f}" in printed
    fastest = max(result["settings"].values(), key=lambda m: m["clips_per_second"])
    assert result["settings"][result["winner"]]["clips_per_second"] == fastest["clips_per_second"]
    assert f"fastest: {result['winner']}" in printed
    assert "10,000 iterations" in printed and "stop_iteration=10000" in printed

    # The real fold through train_fold: 3 iterations of 2 x 2 clips, evaluated at 2 and 3.
    fold = result["fold"]
    assert (fold["iterations"], fold["evaluations"], fold["clips"]) == (3, 2, 12)
    assert fold["clips_per_second"] == pytest.approx(fold["clips"] / fold["wall_seconds"])
    assert all(fold["phase_seconds"][p] > 0 for p in ("data", "steps", "evaluation", "checkpoint"))
    assert sum(fold["shares"].values()) == pytest.approx(1.0)
    assert fold["peak_memory_kind"] == "process RSS" and fold["peak_memory_bytes"] > 2**30
    assert fold["seed_recipe_seconds"] == pytest.approx(gpu_check.fold_extrapolation(fold))
    assert "One fine-tune fold through train_fold" in printed
    assert f"{fold['clips_per_second']:.2f} clips/s over the fold's" in printed
    assert "(a local folder: no uploads)" in printed


def test_dry_run_against_no_known_device_says_so(tmp_path, capsys, monkeypatch):
    # Without --assume-device the CPU has no datasheet peak: the fraction is unknown, said.
    monkeypatch.setattr(gpu_check, "SETTINGS", {gpu_check.FP32: gpu_check.SETTINGS["fp32"]})
    assert gpu_check.main(["--dry-run", "--steps", "1", "--no-fold"]) == 0
    printed = capsys.readouterr().out
    assert "unknown device" in printed and "| unknown " in printed
