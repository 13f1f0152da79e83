"""Resume after a hard stop: SIGKILL during scoring or fine-tuning loses nothing saved, and the
rerun gives what an uninterrupted run gives, bit for bit; SIGTERM / SIGINT stop cleanly."""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from speccore.config import LoraSettings, TrainSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, length_grouped_batches
from speccore.models import attach_lora, tiny_causal_lm
from speccore.scoring import runner
from speccore.scoring.runner import score_samples
from speccore.train import finetune, plan_steps
from speccore.train.loop import CHECKPOINT_FILE
from speccore.utils import interrupt
from speccore.utils.interrupt import Interrupted, interruptible

VOCAB = 83

# The killed run: a fresh process that scores or fine-tunes the tiny model with checkpoints. A
# sleep per batch (scoring) or per forward pass (fine-tune) stands for a slow model: it gives
# the test time to kill the run between two checkpoints without burning CPU. The rerun and the
# uninterrupted reference run in the test's process (one thread, as the worker), which saves a
# second start of torch.
WORKER = r"""
import sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from test_resume import SCORE_ARGS, SETTINGS, TUNE_ARGS, make_data, make_model
from speccore.scoring import runner
from speccore.train import finetune

task, folder = sys.argv[1], Path(sys.argv[2])
model = make_model()
if task == "score":
    real = runner.SCORE_FUNCTIONS["loss"]
    runner.SCORE_FUNCTIONS["loss"] = lambda m, b: (time.sleep(0.2), real(m, b))[1]
    runner.score_samples(model, make_data(), "loss", checkpoint=folder / "loss.npz", **SCORE_ARGS)
else:
    model.register_forward_pre_hook(lambda *_: time.sleep(0.08))
    finetune(model, make_data(), SETTINGS, checkpoint=folder / "ckpt", **TUNE_ARGS)
"""

SCORE_ARGS: dict[str, Any] = {
    "max_batch_tokens": 40,
    "checkpoint_every": 10_000,  # by time only: checkpoint_seconds is what is tested
    "checkpoint_seconds": 0.25,
}
TUNE_ARGS: dict[str, Any] = {
    "max_batch_tokens": 40,
    "checkpoint_steps": 2,  # by steps only
    "checkpoint_seconds": None,
}
SETTINGS = TrainSettings(
    epochs=3, learning_rate=1e-2, batch_size=3, grad_accum=1, warmup_ratio=0.2, seed=7
)


def make_data(n: int = 24, seed: int = 0) -> TokenizedData:
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        length, prompt = int(rng.integers(6, 18)), int(rng.integers(2, 5))
        x = rng.integers(1, VOCAB, length).tolist()
        ids.append(x)
        labels.append([IGNORE_INDEX] * prompt + x[prompt:])
    return TokenizedData(ids, labels, pad_token_id=0)


def make_model() -> Any:
    """A tiny LoRA model with dropout (the fine-tune draws random numbers every step)."""
    return attach_lora(tiny_causal_lm(VOCAB, seed=3), LoraSettings(r=4, alpha=8, dropout=0.1))


@pytest.fixture
def one_thread() -> Any:
    """One torch thread, as in the worker: the same float sums in both processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_worker(tmp_path: Path, task: str) -> subprocess.Popen[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    tests = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, str(script), task, str(tmp_path), tests],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _kill_after_first_checkpoint(proc: subprocess.Popen[str], checkpoint: Path, seed: int) -> None:
    """SIGKILL ``proc`` at a random moment (seeded) after its first checkpoint appears."""
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        if proc.poll() is not None:
            out, _ = proc.communicate()
            raise AssertionError(f"worker ended before its first checkpoint:\n{out}")
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))
    assert proc.poll() is None, "the worker finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.communicate()


@pytest.mark.slow
def test_scoring_killed_with_sigkill_resumes_to_identical_scores(
    tmp_path: Path, one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = tmp_path / "loss.npz"
    _kill_after_first_checkpoint(_run_worker(tmp_path, "score"), ckpt, seed=1)
    with caplog.at_level(logging.INFO, logger="speccore"):
        resumed = score_samples(make_model(), make_data(), "loss", checkpoint=ckpt, **SCORE_ARGS)
    found = re.search(r"resumed (\d+) of (\d+) samples from (\S+)", caplog.text)
    assert found, caplog.text
    assert 0 < int(found[1]) < int(found[2]) == 24 and found[3] == str(ckpt)
    uninterrupted = score_samples(make_model(), make_data(), "loss", max_batch_tokens=40)
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert np.isfinite(resumed).all()


@pytest.mark.slow
def test_finetune_killed_with_sigkill_resumes_to_identical_adapter(
    tmp_path: Path, one_thread: None, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt"
    _kill_after_first_checkpoint(_run_worker(tmp_path, "tune"), folder / CHECKPOINT_FILE, seed=2)
    resumed, whole, data = make_model(), make_model(), make_data()
    with caplog.at_level(logging.INFO, logger="speccore"):
        stats = finetune(resumed, data, SETTINGS, checkpoint=folder, **TUNE_ARGS)
    found = re.search(r"resumed fine-tune at step (\d+) of (\d+) from", caplog.text)
    assert found, caplog.text
    # Token batching (the default): the plan's step count, known up front.
    n_steps = len(plan_steps(data.lengths, SETTINGS))
    assert 0 < int(found[1]) < int(found[2]) == stats["steps"] == n_steps > 20
    want = finetune(whole, data, SETTINGS, max_batch_tokens=40)
    assert stats["final_loss"] == want["final_loss"] and stats["mean_loss"] == want["mean_loss"]
    a, b = _lora(resumed), _lora(whole)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in b)


def _lora(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


# --- SIGTERM / SIGINT in process ---------------------------------------------------------------


def _signal_at_batch(monkeypatch: pytest.MonkeyPatch, batch: int, signum: int) -> None:
    """Make the loss score send ``signum`` to this process while computing batch ``batch``."""
    real = runner.SCORE_FUNCTIONS["loss"]
    calls = []

    def scored(model: Any, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        if len(calls) == batch + 1:
            os.kill(os.getpid(), signum)
        return real(model, tensors)

    monkeypatch.setitem(runner.SCORE_FUNCTIONS, "loss", scored)


def test_sigterm_saves_the_batch_in_progress_then_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model = make_data(), make_model()
    plan = length_grouped_batches(data.lengths, 40)
    whole = score_samples(model, data, "loss", max_batch_tokens=40)
    ckpt = tmp_path / "loss.npz"
    before = signal.getsignal(signal.SIGTERM)
    _signal_at_batch(monkeypatch, batch=2, signum=signal.SIGTERM)
    with pytest.raises(Interrupted) as caught, interruptible():
        score_samples(model, data, "loss", max_batch_tokens=40, checkpoint=ckpt)
    e = caught.value
    saved = sum(len(b) for b in plan[:3])  # the batch in progress (number 2) is finished too
    assert (e.done, e.total, e.unit, e.exit_code) == (saved, 24, "samples", 143)
    assert str(e) == f"interrupted: {saved} of 24 samples saved; rerun the same command to resume"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    monkeypatch.undo()
    calls = []
    real = runner.SCORE_FUNCTIONS["loss"]
    monkeypatch.setitem(
        runner.SCORE_FUNCTIONS, "loss", lambda m, b: (calls.append(len(b["labels"])), real(m, b))[1]
    )
    resumed = score_samples(model, data, "loss", max_batch_tokens=40, checkpoint=ckpt)
    assert sum(calls) == 24 - saved
    np.testing.assert_array_equal(resumed, whole)


def test_sigint_twice_stops_at_once_and_keeps_finished_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model = make_data(), make_model()
    real = runner.SCORE_FUNCTIONS["loss"]
    calls = []

    def scored(m: Any, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(len(tensors["labels"]))
        if len(calls) == 3:  # two Ctrl-C during the third batch: it is not finished
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(m, tensors)

    monkeypatch.setitem(runner.SCORE_FUNCTIONS, "loss", scored)
    ckpt = tmp_path / "loss.npz"
    with pytest.raises(Interrupted) as caught, interruptible():
        score_samples(model, data, "loss", max_batch_tokens=40, checkpoint=ckpt)
    assert caught.value.exit_code == 130
    assert caught.value.done == sum(calls[:2]) and caught.value.total == 24


def test_a_stop_without_a_stop_point_is_raised_when_the_block_ends() -> None:
    with pytest.raises(Interrupted) as caught, interruptible():
        interrupt.report(5, 9, "steps")
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.stop_requested()
    assert (caught.value.done, caught.value.total, caught.value.exit_code) == (5, 9, 143)
    assert "5 of 9 steps saved" in str(caught.value)
    assert not interrupt.stop_requested()


def test_sigterm_during_finetune_saves_the_step_and_resumes_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_data()
    whole = make_model()
    finetune(whole, data, SETTINGS, max_batch_tokens=40)

    model = make_model()
    forwards = []

    def pre_hook(*_args: Any) -> None:
        forwards.append(1)
        if len(forwards) == 11:  # inside step 5 or so: the step is finished, then saved
            os.kill(os.getpid(), signal.SIGTERM)

    handle = model.register_forward_pre_hook(pre_hook)
    folder = tmp_path / "ckpt"
    with pytest.raises(Interrupted) as caught, interruptible():
        finetune(model, data, SETTINGS, max_batch_tokens=40, checkpoint=folder)
    handle.remove()
    e = caught.value
    n_steps = len(plan_steps(data.lengths, SETTINGS))
    assert e.unit == "steps" and e.total == n_steps and 0 < e.done < n_steps
    assert e.exit_code == 143
    state = torch.load(folder / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == e.done

    fresh = make_model()
    stats = finetune(fresh, data, SETTINGS, max_batch_tokens=40, checkpoint=folder)
    assert stats["steps"] == n_steps
    a, b = dict(fresh.named_parameters()), dict(whole.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in b if "lora_" in k)


def test_a_checkpoint_of_another_finetune_is_ignored(tmp_path: Path) -> None:
    data, folder = make_data(), tmp_path / "ckpt"
    finetune(make_model(), data, SETTINGS, checkpoint=folder)
    other = TrainSettings(**{**vars(SETTINGS), "learning_rate": 2e-2})
    model, want = make_model(), make_model()
    finetune(model, data, other, checkpoint=folder)  # must train, not load the other's state
    finetune(want, data, other)
    a, b = dict(model.named_parameters()), dict(want.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in b if "lora_" in k)
