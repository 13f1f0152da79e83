"""The small/target agreement check: Spearman, Rand index of regions, cost per token."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import forward_terms, make_rows, tol
from speccore.data.batches import TokenizedData
from speccore.data.encode import tokenize_pairs
from speccore.models import LoadedModel, load_model
from speccore.proxies.agree import (
    AgreementReport,
    agreement,
    compare,
    sample_rows,
    score_rows,
)
from speccore.selection.agreement import rand_index, rand_index_labels, spearman
from speccore.selection.regions import equal_width_regions
from speccore.utils.errors import ConfigError, DataError


def rows_data(tokenizer: Any, n: int = 16) -> TokenizedData:
    rows = make_rows(n, seed=3)
    prompts = [r["dialogue"] for r in rows]
    return tokenize_pairs(tokenizer, prompts, [r["summary"] for r in rows], 64)


@pytest.fixture(scope="module")
def small(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(str(model_dirs["small"]))


@pytest.fixture(scope="module")
def target(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(str(model_dirs["target"]))


def brute_force_rand(a: np.ndarray, b: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(a)), 2))
    agree = sum((a[i] == a[j]) == (b[i] == b[j]) for i, j in pairs)
    return agree / len(pairs)


def test_rand_index_labels_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    for n, k in [(2, 2), (7, 3), (30, 5), (41, 10)]:
        a, b = rng.integers(0, k, n), rng.integers(0, k, n)
        assert rand_index_labels(a, b) == pytest.approx(brute_force_rand(a, b))
    same = rng.integers(0, 4, 20)
    assert rand_index_labels(same, same) == 1.0
    assert rand_index_labels(same, same + 7) == 1.0  # only the partition counts, not the ids


def test_rand_index_of_equal_width_regions() -> None:
    rng = np.random.default_rng(1)
    small, target = rng.normal(size=50), rng.normal(size=50)
    expected = brute_force_rand(equal_width_regions(small, 4), equal_width_regions(target, 4))
    assert rand_index(small, target, 4) == pytest.approx(expected)
    # A monotone rescaling keeps every region: Rand index 1.
    assert rand_index(small, 3 * small + 2, 10) == 1.0
    assert rand_index(small[:1], target[:1], 10) is None
    with pytest.raises(ValueError):
        rand_index(small, target[:10], 4)


def test_spearman() -> None:
    x = np.array([1.0, 3.0, 2.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(4)) is None
    assert spearman(x[:2], x[:2]) is None  # two samples always rank ±1: not a measurement
    assert spearman(x[:3], x[:3]) == pytest.approx(1.0)


def test_verified_agreement_is_read_one_way_everywhere() -> None:
    """STAFF's record of its verified samples gives the same Rand index through the selection,
    its saved dict, and the small scores looked up by index."""
    from speccore.selection import Selection
    from speccore.selection.agreement import verified_rand_index, verified_scores

    small, target = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 0.1, 2.0, 3.0])
    agree = {"indices": [4, 5, 6, 7], "small": small.tolist(), "target": target.tolist()}
    sel = Selection(
        "staff", np.arange(3), 8, 3, scores=np.arange(8.0) - 4, info={"agreement": agree}
    )
    expected = rand_index(small, target, 2)
    assert verified_rand_index(sel, 2) == verified_rand_index(sel.to_dict(), 2) == expected
    by_index = {"info": {"agreement": {**agree, "small": []}}, "scores": list(range(-4, 4))}
    assert verified_scores(by_index)[0].tolist() == small.tolist()
    assert verified_rand_index({"info": {}}, 2) is None


def test_sample_rows_is_seeded_and_distinct() -> None:
    a = sample_rows(100, 20, seed=5)
    assert len(a) == len(set(a.tolist())) == 20 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_rows(100, 20, seed=5))
    assert not np.array_equal(a, sample_rows(100, 20, seed=6))
    assert np.array_equal(sample_rows(10, 20, seed=5), np.arange(10))


def test_a_model_agrees_perfectly_with_itself(small: LoadedModel) -> None:
    data = rows_data(small.tokenizer)
    report = agreement(small, small, data, rows=10, regions=3, seed=1)
    assert report.rows == 10 and report.same_family
    for score in ("effort", "loss"):
        assert report.spearman[score] == pytest.approx(1.0)
        assert report.rand_index[score] == 1.0
        assert report.small_scores[score] == report.target_scores[score]
    # The fresh adapter is removed again: the model is plain afterwards.
    assert not any("lora_" in n for n, _ in small.model.named_parameters())


def test_agreement_of_a_tiny_pair_is_in_range(small: LoadedModel, target: LoadedModel) -> None:
    data = rows_data(small.tokenizer)
    report = agreement(small, target, data, rows=12, regions=4, seed=2, max_batch_tokens=128)
    assert isinstance(report, AgreementReport)
    assert report.indices == sample_rows(len(data), 12, 2).tolist()
    for score in ("effort", "loss"):
        rho = report.spearman[score]
        assert rho is not None and -1.0 <= rho <= 1.0
        rand = report.rand_index[score]
        assert rand is not None and 0.0 <= rand <= 1.0
        assert len(report.small_scores[score]) == 12
        assert report.small_scores[score] != report.target_scores[score]
    assert report.small_seconds > 0 and report.target_seconds > 0
    assert report.small_tokens == report.target_tokens == int(data.lengths[report.indices].sum())
    assert report.cost_ratio == pytest.approx(report.small_seconds / report.target_seconds)
    text = report.format()
    assert "Spearman" in text and "effort" in text and "loss" in text and "same family" in text
    assert report.to_dict()["cost_ratio"] == report.cost_ratio


def test_score_once_and_compare_is_agreement(small: LoadedModel, target: LoadedModel) -> None:
    data = rows_data(small.tokenizer)
    small_rows = score_rows(small, data, rows=8, seed=1, max_batch_tokens=128)
    target_rows = score_rows(target, data, rows=8, seed=1)
    report = compare(small_rows, target_rows, regions=3)
    direct = agreement(small, target, data, rows=8, regions=3, seed=1)
    assert report.indices == direct.indices and report.seed == 1
    # The small model scored in batches of at most 128 tokens here, in one batch by `agreement`:
    # other padding, other float32 sums. Effort is a gradient norm: a forward and a backward pass
    # over rows of up to 64 tokens (the loss only needs the forward; the bound covers both).
    rtol = tol(torch.float32, forward_terms(small.model, 64, backward=True))
    for score in ("effort", "loss"):
        np.testing.assert_allclose(
            report.small_scores[score], direct.small_scores[score], rtol=rtol
        )
        # Order and regions, hence Spearman and the Rand index, stay the same while no two of
        # the eight scores (or a score and a region edge) lie within rtol of each other.
        assert report.spearman[score] == pytest.approx(direct.spearman[score])
        assert report.rand_index[score] == direct.rand_index[score]
    with pytest.raises(DataError, match="different rows"):
        compare(small_rows, score_rows(target, data, rows=8, seed=2, scores=["loss"]))
    with pytest.raises(ConfigError, match="--regions"):
        compare(small_rows, target_rows, regions=0)


def test_agreement_by_name_and_loss_only(model_dirs: dict[str, Path], small: LoadedModel) -> None:
    data = rows_data(small.tokenizer)
    report = agreement(
        str(model_dirs["small"]), str(model_dirs["target"]), data, rows=6, scores=["loss"]
    )
    assert list(report.spearman) == ["loss"] and report.rows == 6


def test_cross_family_needs_data_per_model(model_dirs: dict[str, Path], small: LoadedModel) -> None:
    other = load_model(str(model_dirs["other"]))
    with pytest.raises(ConfigError, match="different tokenizers"):
        agreement(small, other, rows_data(small.tokenizer), rows=4)
    with pytest.warns(UserWarning, match="different tokenizers"):
        report = agreement(small, other, rows_data, rows=5, scores=["loss"])
    assert not report.same_family and report.rows == 5
    assert report.small_tokens != report.target_tokens
    assert "DIFFERENT families" in report.format()


def test_bad_arguments(small: LoadedModel) -> None:
    data = rows_data(small.tokenizer)
    with pytest.raises(ConfigError, match="--rows"):
        agreement(small, small, data, rows=1)
    with pytest.raises(ConfigError, match="--regions"):
        agreement(small, small, data, regions=0)
    with pytest.raises(DataError, match="same rows"):
        agreement(small, small, (data, data.subset(range(5))), rows=4)


def test_agree_command(
    model_dirs: dict[str, Path], jsonl_data: Path, capsys: pytest.CaptureFixture
) -> None:
    from speccore.cli import main

    data_flags = ["--data", str(jsonl_data), "--input-field", "dialogue",
                  "--output-field", "summary", "--max-length", "64"]  # fmt: skip
    models = ["--small", str(model_dirs["small"]), "--target", str(model_dirs["target"])]
    assert main(["agree", *models, *data_flags, "--rows", "8", "--regions", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Spearman" in printed and "Rand index" in printed and "8 rows" in printed
    assert "K = 3" in printed and "same family" in printed

    # A derived small model: built from the target on the data, then compared.
    derived = ["--small", "derive:1,heal_steps=1", "--target", str(model_dirs["target"])]
    assert main(["agree", *derived, *data_flags, "--rows", "5"]) == 0
    assert "5 rows" in capsys.readouterr().out
    assert main(["agree", *models, *data_flags, "--rows", "1"]) == 2
    assert "--rows" in capsys.readouterr().err


def test_select_summary_prints_the_rand_index_of_verified_samples() -> None:
    from speccore.run.summary import describe, summary_text, verified_rand_index
    from speccore.selection.base import Selection

    small = [0.1, 0.2, 0.8, 0.9, 0.5]
    target = [1.0, 1.1, 0.2, 9.0, 5.0]
    selection = Selection(
        method="staff",
        indices=np.arange(3),
        n_total=5,
        budget=3,
        info={"agreement": {"spearman": 0.4, "n": 5, "small": small, "target": target}},
        config={"regions": 2},
    )
    expected = brute_force_rand(
        equal_width_regions(np.array(small), 2), equal_width_regions(np.array(target), 2)
    )
    assert verified_rand_index(selection) == pytest.approx(expected)
    assert f"Spearman 0.40, Rand index {expected:.2f} over 5 samples" in summary_text(selection)
    described = describe(selection, None, None, None, None)  # type: ignore[arg-type]
    assert described["agreement_rand_index"] == expected
    selection.info["agreement"] = {"spearman": 0.4, "n": 5}  # no verified scores recorded
    assert verified_rand_index(selection) is None and "Rand index" not in summary_text(selection)
