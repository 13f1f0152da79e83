"""speed-bench/device_suite.py --tiny: every step runs on the CPU and writes sane figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from conftest import forward_terms, tol

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "speed-bench" / "device_suite.py"

# Every test starts the suite in a fresh interpreter (torch and speccore imported again), and
# the first runs its four steps of model work.
pytestmark = pytest.mark.slow


# The larger of the suite's two tiny models (TINY_PLAN in device_suite.py: hidden 48, 3 layers,
# vocabulary 400, rows of 32 tokens, float32): its rounding bound covers the smaller one too.
TINY_M = LlamaConfig(
    vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip
A_VS_B_RTOL = tol(torch.float32, forward_terms(TINY_M, 32, backward=True))


def run_suite(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_tiny_suite_writes_every_step_and_reruns_one(tmp_path: Path) -> None:
    proc = run_suite(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "device_suite.json").read_text(encoding="utf-8"))
    assert data["mode"] == "tiny" and sorted(data["steps"]) == ["1", "2", "3", "4", "5", "6"]
    steps = data["steps"]
    assert not any("error" in s for s in steps.values())

    one = steps["1"]["models"]
    assert len(one) == 2
    for m in one:
        kinds = ("a", "b", "c", "ft", "ft+")
        assert all(positive(m["tokens_per_s"][k]) for k in kinds)
        rates = m["tokens_per_s"]  # rounded to 0.1 token/s in the file
        assert math.isclose(m["a_over_c"], rates["a"] / rates["c"], rel_tol=1e-3)
        assert math.isclose(m["ft_over_c"], rates["ft"] / rates["c"], rel_tol=1e-3)
        assert m["repeats"] >= 2 and set(m["spread"]) == set(kinds)
        assert all(v is None for v in m["mfu"].values())  # no MFU without a GPU
        assert m["goal_a_ge_2b"] == (m["a_over_b"] >= 2)
        # float32: (a) and (b) are both exact, up to their other float sums (batched against
        # one row at a time) in a forward and a backward pass.
        assert m["max_rel_error_a_vs_b"] <= A_VS_B_RTOL

    two = steps["2"]
    assert set(two["scores"]) == {"effort", "loss", "el2n"}
    assert two["bound"] == 2 * (two["layers"] + 1) * 2.0**-8
    for s in two["scores"].values():
        assert 0.99 <= s["spearman"] <= 1
        assert 0 < s["max_rel_error"] <= two["bound"] and s["within_bound"]

    for key, epochs in (("3", 1), ("6", 3)):
        check_staff_vs_grand(steps[key], epochs)

    four = steps["4"]
    rate = four["scoring"]["tokens_per_s"]
    assert positive(rate)
    assert math.isclose(four["million_rows_seconds"], 1e6 * four["row_tokens"] / rate)
    assert set(four["peak_gpu_gib_by_stage"]) == {"staff", "grand"}

    five = steps["5"]["tables"]
    assert set(five) == {"fine-tune step", "effort batch"}
    for table in five.values():
        assert 0 < len(table) <= 10 and all(r["self_ms"] >= 0 for r in table)
        assert [r["self_ms"] for r in table] == sorted((r["self_ms"] for r in table), reverse=True)

    md = (tmp_path / "device_suite.md").read_text(encoding="utf-8")
    for n in "123456":
        assert f"## Step {n}:" in md
    assert "| tiny-s |" in md and "STAFF/GraNd = " in md

    # --steps 2 reruns that step only and keeps the others.
    steps["2"]["date"] = "before"
    (tmp_path / "device_suite.json").write_text(json.dumps(data), encoding="utf-8")
    proc = run_suite(tmp_path, "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "device_suite.json").read_text(encoding="utf-8"))["steps"]
    assert again["2"]["date"] != "before"
    assert {k: again[k] for k in "13456"} == {k: steps[k] for k in "13456"}


def test_bad_steps_are_refused(tmp_path: Path) -> None:
    proc = run_suite(tmp_path, "--steps", "1,7")
    assert proc.returncode == 2 and "--steps" in proc.stderr
    assert not (tmp_path / "device_suite.json").exists()


def check_staff_vs_grand(three: dict[str, Any], epochs: int) -> None:
    assert three["settings"]["T"] == epochs
    staff, grand = three["runs"]["staff"], three["runs"]["grand"]
    assert positive(staff["timings"]["total"]) and positive(grand["timings"]["total"])
    assert math.isclose(
        three["staff_over_grand"], staff["timings"]["total"] / grand["timings"]["total"]
    )
    # STAFF scores at most K * b_v samples on the target; GraNd fine-tunes and scores it.
    k, b_v = three["settings"]["K"], three["settings"]["b_v"]
    assert 0 < staff["target_samples_scored"] <= k * b_v
    assert "small fine-tune" in staff["timings"] and "target fine-tune" in grand["timings"]
    assert staff["kept"] == grand["kept"] > 0
    tune = staff["stage_tokens"]["small fine-tune"]
    assert tune["tokens"] > 0 and 0 <= tune["padding_fraction"] < 0.2
