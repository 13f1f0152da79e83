"""The bench end to end on tiny random models: config loading, generation, the cell loop, its
outputs, resuming after an interruption, and refusing to mix settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import micro_bench_settings
from speccore.bench import (
    bench_config_from_dict,
    load_bench_config,
    plan_cells,
    read_results_csv,
    run_bench,
)
from speccore.bench.generate import _decode, encode_prompts, generate
from speccore.bench.run import BenchRunner
from speccore.cli import main
from speccore.models import load_model
from speccore.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_settings(tmp_path: Path, model_dirs: dict[str, Path]) -> dict[str, Any]:
    """A micro bench: 12 training rows, 4 evaluation rows, tiny models, few tokens."""
    return micro_bench_settings(tmp_path, model_dirs)


# --- configuration ------------------------------------------------------------------------


def test_shipped_configs_load() -> None:
    mini = load_bench_config(REPO / "quality-bench" / "mini-uitrans.yaml")
    assert mini.metrics.unicode_rouge and mini.data.train_rows == 400
    assert mini.data.eval_rows == 200 and mini.seeds == list(range(10))
    assert mini.metrics.generate_rows == 0 and mini.prune_rates == [0.9]
    cells = [c.name for c in plan_cells(mini)]
    assert cells[:2] == ["zero-shot", "staff_p0.9_s0"]
    assert len(cells) == 1 + 3 * 10  # staff, random, ccs × 10 seeds
    dialogsum = load_bench_config(REPO / "quality-bench" / "mini-dialogsum.yaml")
    assert dialogsum.data.eval_rows == 100 and len(plan_cells(dialogsum)) == 1 + 2 * 6
    # The committed UI results come with the config that made them (bench_config.json).
    ran = load_bench_config(REPO / "quality-bench" / "results" / "mini-uitrans" / "config.yaml")
    recorded = json.loads(
        (REPO / "quality-bench" / "results" / "mini-uitrans" / "bench_config.json").read_text()
    )
    assert (ran.full, ran.methods, ran.prune_rates) == (
        recorded["full"],
        recorded["methods"],
        recorded["prune_rates"],
    )
    derived = ran.select_config("staff-derived", 0.9, 1)
    assert derived.method == "staff" and derived.small == "derive:0.33"
    full = load_bench_config(REPO / "quality-bench" / "full-dialogsum.yaml")
    sel = full.select_config("staff", 0.9, 2)
    staff = sel.method_settings
    assert (staff.regions, staff.verify_per_region, sel.small_epochs, sel.seed) == (50, 10, 3.0, 2)
    # The authors' fine-tunes: target 4 epochs, both at 1e-4.
    assert (full.finetune.epochs, full.finetune.learning_rate, sel.train.learning_rate) == (
        4.0,
        1e-4,
        1e-4,
    )
    assert len(plan_cells(full)) == 1 + 3 + 8 * 5 * 3


@pytest.mark.parametrize("name", ["mini-uitrans-seeds", "mini-dialogsum-seeds"])
def test_committed_results_come_from_the_committed_config(name: str) -> None:
    """Issue 24: a committed bench's ``config.yaml`` (a copy of the shipped config) gives
    exactly the settings and grid its cells recorded in ``bench_config.json``."""
    folder = REPO / "quality-bench" / "results" / name
    ran = load_bench_config(folder / "config.yaml")
    shipped = load_bench_config(REPO / "quality-bench" / f"{name.removesuffix('-seeds')}.yaml")
    recorded = json.loads((folder / "bench_config.json").read_text(encoding="utf-8"))
    settings = json.loads(json.dumps(ran.settings_dict()))
    assert settings == recorded["settings"]
    assert json.loads(json.dumps(shipped.settings_dict())) == recorded["settings"]
    assert (ran.methods, ran.prune_rates, ran.seeds, ran.full, ran.zero_shot) == (
        recorded["methods"],
        recorded["prune_rates"],
        recorded["seeds"],
        recorded["full"],
        recorded["zero_shot"],
    )
    # Every row of results.csv is a cell of this grid (a bench stopped early has fewer).
    rows = read_results_csv(folder / "results.csv")
    planned = {(c.method, c.prune_rate, c.seed) for c in plan_cells(ran)}
    ran_cells = {(r["method"], r["prune_rate"] or 0.0, r["seed"]) for r in rows}
    assert len(ran_cells) == len(rows) and ran_cells <= planned


def test_epoch_curve_script_prints_a_markdown_table(
    bench_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "epoch_curve", REPO / "speed-bench" / "epoch_curve.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(bench_settings), encoding="utf-8")
    table = tmp_path / "curve.md"
    args = ["--config", str(config), "--epochs", "1", "2", "--root", str(tmp_path / "curve")]
    assert module.main([*args, "--table", str(table)]) == 0
    text = table.read_text(encoding="utf-8")
    lines = [x for x in text.splitlines() if x.startswith("| 1 |") or x.startswith("| 2 |")]
    assert len(lines) == 2 and "random − full" in text
    one = json.loads((tmp_path / "curve" / "e1" / "cells" / "full_s0.json").read_text())
    two = json.loads((tmp_path / "curve" / "e2" / "cells" / "full_s0.json").read_text())
    assert one["settings"]["finetune"]["epochs"] == 1 and two["settings"]["finetune"]["epochs"] == 2
    assert one["predictions"] == [] and f"| 1 | {one['metrics']['nll']:.3f} |" in lines[0]


def test_defaults_are_the_papers_grid(bench_settings: dict[str, Any]) -> None:
    del bench_settings["prune_rates"], bench_settings["seeds"]
    cfg = bench_config_from_dict(bench_settings)
    assert cfg.prune_rates == [0.2, 0.5, 0.7, 0.8, 0.9] and cfg.seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 1}, "unknown key epochs; valid keys in the top level"),
        ({"finetune": {"lr": 1e-4}}, "unknown key finetune.lr; valid keys in finetune"),
        ({"generation": {"max_new_tokens": "many"}}, "generation.max_new_tokens must be int"),
        ({"select": {"seed": 3}}, "select.seed is set by the bench from seeds"),
        ({"select": {"regionz": 3}}, "unknown setting 'regionz'; did you mean regions"),
        ({"methods": ["staff", "magic"]}, "unknown method 'magic'"),
        ({"prune_rates": [0.0]}, "prune_rates must be in (0, 1)"),
        ({"finetune": {"seed": 4}}, "finetune.seed is not used"),
        ({"metrics": {"rouge_tokenizer": "nltk"}}, "metrics.rouge_tokenizer"),
    ],
)
def test_config_errors_name_the_key(
    bench_settings: dict[str, Any], change: dict[str, Any], message: str
) -> None:
    settings = {**bench_settings, **change}
    with pytest.raises(ConfigError) as err:
        bench_config_from_dict(settings)
    assert message in str(err.value)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("out: x\ndata: [1, 2]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"b\.yaml: data must be a mapping"):
        load_bench_config(path)


# --- generation -----------------------------------------------------------------------------


def test_batched_left_padded_generation_equals_one_by_one(model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(model_dirs["target"]))
    prompts = ["the report", "the team travels to Berlin and Hamburg to meet", "sales"]
    kw = {"max_new_tokens": 6, "max_prompt_tokens": 32}
    batched = generate(loaded.model, loaded.tokenizer, prompts, batch_size=3, **kw)  # type: ignore[arg-type]
    single = [generate(loaded.model, loaded.tokenizer, [p], batch_size=1, **kw)[0] for p in prompts]  # type: ignore[arg-type]
    assert batched == single
    assert any(batched)  # a random model still emits tokens


def test_decode_stops_at_eos_and_prompts_keep_their_bos(model_dirs: dict[str, Path]) -> None:
    tok = load_model(str(model_dirs["other"])).tokenizer  # Gemma-like: BOS on every call
    eos = tok.eos_token_id
    ids = tok("the cat", add_special_tokens=False)["input_ids"]
    assert _decode(tok, [*ids, eos, *ids], [eos]) == tok.decode(ids).strip()
    (long,) = encode_prompts(tok, ["the report describes sales costs and the plan"], 4)
    full = tok("the report describes sales costs and the plan")["input_ids"]
    assert long == [tok.bos_token_id, *full[-3:]]


# --- the loop -------------------------------------------------------------------------------


def test_micro_bench_end_to_end_through_the_cli(
    bench_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_settings["methods"] = ["staff", "random"]
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(bench_settings), encoding="utf-8")
    assert main(["bench", str(config)]) == 0
    out = Path(bench_settings["out"])
    assert "4 cells run, 0 already finished" in capsys.readouterr().out
    csv_lines = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[0] for line in csv_lines[1:]] == [
        "zero-shot",
        "full",
        "staff",
        "random",
    ]
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert {n: c["coreset_size"] for n, c in cells.items()} == {
        "zero-shot": 0,
        "full_s0": 12,
        "staff_p0.5_s0": 6,
        "random_p0.5_s0": 6,
    }
    staff = cells["staff_p0.5_s0"]
    assert len(staff["predictions"]) == 4 and staff["metrics"]["n_eval"] == 4
    assert {"small fine-tune", "target verification"} <= set(staff["selection"]["timings"])
    assert staff["selection"]["seconds"] > 0 and staff["train_seconds"] > 0
    assert 0 <= staff["selection"]["rand_index"] <= 1  # regions of the verified samples
    assert (out / "selections" / "staff_p0.5_s0.json").is_file()
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "| staff |" in table and "| full data (p = 0) |" in table and "## BLEU-4" in table
    pngs = ("rougeL_vs_prune_rate.png", "bleu4_vs_prune_rate.png", "staff_regions_p0.5.png")
    for png in (*pngs, "staff_effort_small_vs_target.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Rerunning finds every cell finished and only rewrites the reports.
    assert main(["bench", str(config)]) == 0
    assert "0 cells run, 4 already finished" in capsys.readouterr().out
    assert main(["bench", str(config), "--report-only"]) == 0
    assert f"wrote {out / 'table.md'}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["bench", str(config), "--out", str(empty), "--report-only"]) == 2
    assert "no finished cells" in capsys.readouterr().err


def test_a_variant_with_a_derived_small_model_is_run_and_compared_with_its_method(
    bench_settings: dict[str, Any],
) -> None:
    variant = {"method": "staff", "small": "derive:0.5,heal_steps=2"}
    bench_settings.update(
        methods=["staff", "staff-derived"],
        variants={"staff-derived": variant},
        zero_shot=False,
        full=False,
    )
    cfg = bench_config_from_dict(bench_settings)
    run_bench(cfg, plots=False)
    cells = {p.stem: json.loads(p.read_text()) for p in (cfg.folder / "cells").glob("*.json")}
    derived, staff = cells["staff-derived_p0.5_s0"], cells["staff_p0.5_s0"]
    assert derived["variant"] == variant and "variant" not in staff
    assert "small derive" in derived["selection"]["timings"]
    assert "small derive" not in staff["selection"]["timings"]
    plan = json.loads((cfg.folder / "bench_config.json").read_text())
    assert plan["variants"] == {"staff-derived": variant}
    table = (cfg.folder / "table.md").read_text(encoding="utf-8")
    variants = table.split("## Variants vs their method")[1].split("##")[0]
    assert "| staff-derived − staff | ROUGE-L | 0.5 |" in variants
    agreement = table.split("## Small/target agreement")[1].split("##")[0]
    assert "| staff | 0.5 |" in agreement and "| staff-derived | 0.5 |" in agreement


def metric_blocks(folder: Path) -> str:
    return (folder / "table.md").read_text(encoding="utf-8").split("## Selection overhead")[0]


def test_resume_after_an_interruption_recomputes_nothing_finished(
    bench_settings: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = bench_config_from_dict(bench_settings)
    real_run_cell = BenchRunner.run_cell
    computed: list[str] = []

    def interrupted(self: BenchRunner, cell: Any) -> dict[str, Any]:
        if computed:  # the second cell: killed half-way
            raise KeyboardInterrupt
        computed.append(cell.name)
        return real_run_cell(self, cell)

    monkeypatch.setattr(BenchRunner, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg)
    out = cfg.folder
    assert [p.stem for p in (out / "cells").glob("*.json")] == ["zero-shot"]
    first = (out / "cells" / "zero-shot.json").read_bytes()

    computed.clear()
    loads: list[str] = []

    def counting(self: BenchRunner, cell: Any) -> dict[str, Any]:
        computed.append(cell.name)
        return real_run_cell(self, cell)

    import speccore.models.pool as pool  # every model load goes through the pool

    real_load = pool.load_model
    monkeypatch.setattr(BenchRunner, "run_cell", counting)
    monkeypatch.setattr(
        pool, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k)
    )
    result = run_bench(cfg)
    assert computed == ["full_s0", "random_p0.5_s0"] == result.ran
    assert result.skipped == ["zero-shot"]
    assert (out / "cells" / "zero-shot.json").read_bytes() == first
    assert len(loads) == 1  # the target, once for all cells (random loads no model)

    straight = bench_config_from_dict({**bench_settings, "out": str(tmp_path / "b" / "bench")})
    run_bench(straight, plots=False)
    assert metric_blocks(out) == metric_blocks(straight.folder)
    for name in ("zero-shot", "full_s0", "random_p0.5_s0"):
        a = json.loads((out / "cells" / f"{name}.json").read_text())
        b = json.loads((straight.folder / "cells" / f"{name}.json").read_text())
        assert a["predictions"] == b["predictions"] and a["metrics"] == b["metrics"]


def test_lora_is_detached_after_every_cell(bench_settings: dict[str, Any]) -> None:
    bench_settings["zero_shot"] = False
    runner = BenchRunner(bench_config_from_dict(bench_settings))
    runner.run(plots=False)
    base = runner.base
    assert not hasattr(base, "peft_config")
    assert not any("lora_" in name for name, _ in base.named_parameters())


def test_changed_settings_are_refused_not_mixed(bench_settings: dict[str, Any]) -> None:
    bench_settings["full"] = False
    run_bench(bench_config_from_dict(bench_settings), plots=False)
    bench_settings["finetune"] = {"epochs": 2, "batch_size": 4}
    with pytest.raises(ConfigError, match=r"other settings \(changed: finetune\.epochs\)"):
        run_bench(bench_config_from_dict(bench_settings), plots=False)
    # More seeds or methods are new cells of the same bench, not other settings.
    bench_settings["finetune"] = {"epochs": 1, "batch_size": 4}
    bench_settings["seeds"] = [0, 1]
    result = run_bench(bench_config_from_dict(bench_settings), plots=False)
    assert result.ran == ["random_p0.5_s1"]
    # The generation batch size changes speed, not outputs: the bench resumes under another.
    bench_settings["generation"] = {"max_new_tokens": 5, "batch_size": 1}
    bench_settings["seeds"] = [0, 1, 2]
    result = run_bench(bench_config_from_dict(bench_settings), plots=False)
    assert result.ran == ["random_p0.5_s2"]


def test_cells_fingerprinted_with_the_generation_batch_size_are_kept(
    bench_settings: dict[str, Any],
) -> None:
    """Cells written before the batch size left the fingerprint: their stored settings still
    hold it, and their fingerprint is another; they are kept, not refused."""
    from speccore.bench.run import check_settings
    from speccore.utils.io import fingerprint

    cfg = bench_config_from_dict(bench_settings)
    now = cfg.settings_dict()
    old = {**now, "generation": {**now["generation"], "batch_size": 16}}
    record = {"settings": old, "settings_fp": fingerprint(old)}
    check_settings({"random_p0.5_s0": record}, now, cfg.folder)  # no error
    other = {**old, "finetune": {**now["finetune"], "epochs": 7}}
    with pytest.raises(ConfigError, match=r"changed: finetune\.epochs\)"):
        check_settings({"x": {"settings": other, "settings_fp": "?"}}, now, cfg.folder)


def test_sigterm_during_generation_stops_the_bench_at_the_next_batch(
    bench_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import os
    import signal

    from speccore.utils.interrupt import Interrupted, interruptible

    generation = {"max_new_tokens": 5, "batch_size": 1}  # 4 evaluation rows: 4 batches
    cfg = bench_config_from_dict({**bench_settings, "generation": generation})
    gen = importlib.import_module("speccore.bench.generate")  # the module, not the function
    batches: list[int] = []
    real_greedy = gen.greedy_tokens

    def greedy_then_signal(*args: Any, **kwargs: Any) -> Any:
        batches.append(1)
        if len(batches) == 2:  # during the zero-shot cell's second batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_greedy(*args, **kwargs)

    monkeypatch.setattr(gen, "greedy_tokens", greedy_then_signal)
    with pytest.raises(Interrupted) as caught, interruptible():
        run_bench(cfg, plots=False)
    assert len(batches) == 2  # stopped before the third batch, not at the end of the cell
    assert caught.value.exit_code == 143
    assert not list((cfg.folder / "cells").glob("*.json"))  # no half cell was written
    assert "0 of 3 cells saved" in str(caught.value)


@pytest.mark.parametrize("which", ["target", "other"])  # Llama-like, Gemma-like
def test_greedy_tokens_equal_generate_and_stop_each_row_at_its_eos(
    model_dirs: dict[str, Path], which: str
) -> None:
    import torch
    from transformers import GenerationConfig

    from speccore.bench.generate import greedy_tokens

    loaded = load_model(str(model_dirs[which]))
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = ["the report", "the team travels to Berlin and Hamburg to meet", "sales", "a b"]
    ids = encode_prompts(tok, prompts, 32)
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.inference_mode():
        free = greedy_tokens(model, input_ids, mask, max_new_tokens=8, stops=[-1])
        # Make two rows stop early: their 2nd and 4th tokens become stop tokens.
        stops = [free[0][1], free[2][3]]
        ours = greedy_tokens(model, input_ids, mask, max_new_tokens=8, stops=stops)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=8, eos_token_id=stops, pad_token_id=0
        )
        theirs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    for row, got in enumerate(ours):
        assert got[-1] in stops or len(got) == 8
        assert not set(got[:-1]) & set(stops)  # a row stops at its first stop token
        assert got == theirs[row, width : width + len(got)].tolist()
    assert len(ours[0]) <= 2 and len(ours[2]) <= 4  # those rows left the batch early
    assert [len(r) for r in free] == [8] * 4


def test_a_stop_string_ends_a_row_and_cuts_its_text(model_dirs: dict[str, Path]) -> None:
    loaded = load_model(str(model_dirs["target"]))
    model, tok = loaded.model, loaded.tokenizer
    prompts = ["the report", "the team travels to Berlin and Hamburg to meet"]
    kw = {"max_new_tokens": 12, "max_prompt_tokens": 32, "batch_size": 2}
    free = generate(model, tok, prompts, **kw)  # type: ignore[arg-type]
    text = free[0]
    assert len(text) >= 8  # a random model rambles: take two characters of its middle as a stop
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = generate(model, tok, prompts, stop=[stop], **kw)  # type: ignore[arg-type]
    assert cut[0] == text[: text.find(stop)].strip()
    assert stop not in cut[1] and free[1].startswith(cut[1])

    from speccore.bench.generate import greedy_tokens, text_stop

    ids = torch.tensor([encode_prompts(tok, prompts[:1], 32)[0]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        tokens = greedy_tokens(
            model, ids, mask, max_new_tokens=12, stops=[-1], done=text_stop(tok, [stop])
        )[0]
    assert stop in tok.decode(tokens) and stop not in tok.decode(tokens[:-1])  # no token more


def test_generation_stop_must_be_strings(bench_settings: dict[str, Any]) -> None:
    bench_settings["generation"] = {"stop": [""]}
    with pytest.raises(ConfigError, match=r"generation\.stop takes non-empty strings"):
        bench_config_from_dict(bench_settings).validate()


# --- selection seeds, cheaper cells, stale cells ---------------------------------------------


def small_adapters(folder: Path) -> int:
    return len(list((folder / "cache" / "adapters").glob("*/adapter_model.safetensors")))


@pytest.mark.parametrize(
    ("mode", "adapters", "tune_seeds"), [("shared", 1, [0, 0]), ("per_seed", 2, [0, 1])]
)
def test_selection_seeds_choose_whether_seeds_vary_the_selections_fine_tunes(
    bench_settings: dict[str, Any], mode: str, adapters: int, tune_seeds: list[int]
) -> None:
    bench_settings.update(
        methods=["staff", "random"],
        seeds=[0, 1],
        full=False,
        zero_shot=False,
        selection_seeds=mode,
    )
    cfg = bench_config_from_dict(bench_settings)
    run_bench(cfg, plots=False)
    # STAFF's small model is the only adapter a selection saves here.
    assert small_adapters(cfg.folder) == adapters
    cells = {p.stem: json.loads(p.read_text()) for p in (cfg.folder / "cells").glob("*.json")}
    assert [cells[f"staff_p0.5_s{s}"]["tune_seed"] for s in (0, 1)] == tune_seeds
    assert cells["staff_p0.5_s1"]["settings"]["selection_seeds"] == mode
    table = (cfg.folder / "table.md").read_text(encoding="utf-8")
    assert f"(`selection_seeds: {mode}`)" in table


def test_selection_seeds_are_checked(bench_settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="selection_seeds must be shared or per_seed"):
        bench_config_from_dict({**bench_settings, "selection_seeds": "each"})
    select = {**bench_settings["select"], "tune_seed": 3}
    with pytest.raises(ConfigError, match=r"select\.tune_seed is set by the bench"):
        bench_config_from_dict({**bench_settings, "select": select, "selection_seeds": "per_seed"})


def test_reference_nll_only_generates_nothing(
    bench_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import speccore.bench.run as run_module

    def no_generation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("generation ran")

    monkeypatch.setattr(run_module, "generate", no_generation)
    metrics = {**bench_settings["metrics"], "generate_rows": 0}
    cfg = bench_config_from_dict({**bench_settings, "metrics": metrics, "seeds": [0, 1]})
    result = run_bench(cfg, plots=True)
    cell = json.loads((cfg.folder / "cells" / "random_p0.5_s0.json").read_text())
    assert cell["predictions"] == [] and cell["metrics"]["rougeL"] is None
    assert cell["metrics"]["n_nll"] == 4 and len(cell["per_row"]["nll"]) == 4
    table = (cfg.folder / "table.md").read_text(encoding="utf-8")
    rouge = table.split("## BLEU-4")[0].split("## ROUGE-L")[1]
    assert (
        "_No cell generated text (`metrics.generate_rows: 0`" in rouge and "| random" not in rouge
    )
    assert "### Δ vs random: reference NLL" in table
    assert len(result.rows) == 1 + 2 * 2 and all(r["rougeL"] is None for r in result.rows)


def test_generation_on_fewer_rows_than_the_reference_nll(bench_settings: dict[str, Any]) -> None:
    metrics = {**bench_settings["metrics"], "generate_rows": 2}
    cfg = bench_config_from_dict({**bench_settings, "metrics": metrics, "zero_shot": False})
    run_bench(cfg, plots=False)
    cell = json.loads((cfg.folder / "cells" / "random_p0.5_s0.json").read_text())
    assert len(cell["predictions"]) == 2 and cell["metrics"]["n_eval"] == 2
    assert cell["metrics"]["n_nll"] == 4 and len(cell["per_row"]["rougeL"]) == 2
    with pytest.raises(ConfigError, match=r"metrics\.generate_rows must be >= 0"):
        bench_config_from_dict({**bench_settings, "metrics": {"generate_rows": -1}})


def test_stale_cells_are_run_again_not_mixed_in(
    bench_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import speccore.bench.versions as versions

    bench_settings.update(
        methods=["random", "random-b"],
        variants={"random-b": {"method": "random", "batch_size": 2}},
        full=False,
    )
    cfg = bench_config_from_dict(bench_settings)
    first = run_bench(cfg, plots=False)
    assert first.ran == ["zero-shot", "random_p0.5_s0", "random-b_p0.5_s0"]
    assert run_bench(cfg, plots=False).ran == []
    # Another variant definition: only the variant's cells run again.
    bench_settings["variants"] = {"random-b": {"method": "random", "batch_size": 3}}
    cfg = bench_config_from_dict(bench_settings)
    assert run_bench(cfg, plots=False).ran == ["random-b_p0.5_s0"]
    # A cell written before settings and versions it lacks existed (an old cell): kept settings,
    # run again for its missing code versions; no refusal.
    path = cfg.folder / "cells" / "random_p0.5_s0.json"
    old = json.loads(path.read_text())
    for key in ("code_versions", "cell_fp", "tune_seed"):
        old.pop(key)
    old["settings"].pop("selection_seeds")
    old["settings"]["metrics"].pop("generate_rows")
    old["settings_fp"] = "older"
    path.write_text(json.dumps(old))
    assert run_bench(cfg, plots=False).ran == ["random_p0.5_s0"]
    # New generation code: every cell, zero-shot included.
    monkeypatch.setattr(versions, "GENERATION_VERSION", versions.GENERATION_VERSION + 1)
    from speccore.bench.run import report_only

    report_only(cfg, plots=False)
    table = (cfg.folder / "table.md").read_text(encoding="utf-8")
    assert "_3 of 3 cells are stale (made by older code" in table
    assert run_bench(cfg, plots=False).ran == first.ran
    report_only(cfg, plots=False)
    assert "stale" not in (cfg.folder / "table.md").read_text(encoding="utf-8")


def test_dry_run_lists_the_cells_with_estimates_and_writes_nothing(
    bench_settings: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench_settings.update(
        methods=["random"],
        full=False,
        data={**bench_settings["data"], "train_rows": 10, "row_sampling": "random"},
    )
    cfg = bench_config_from_dict(bench_settings)
    run_bench(cfg, plots=False)  # zero-shot and random_p0.5_s0 finished
    bench_settings.update(methods=["random", "staff"], seeds=[0, 1])
    config = tmp_path / "dry.yaml"
    config.write_text(yaml.safe_dump(bench_settings), encoding="utf-8")
    before = {p: p.stat().st_mtime_ns for p in cfg.folder.rglob("*")}
    assert main(["bench", str(config), "--dry-run"]) == 0
    assert {p: p.stat().st_mtime_ns for p in cfg.folder.rglob("*")} == before
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if "_p0.5_" in line or line.startswith("zero-shot")
    }
    assert lines["zero-shot"][1] == "finished" and lines["random_p0.5_s0"][1] == "finished"
    assert [lines[n][1] for n in ("staff_p0.5_s0", "random_p0.5_s1", "staff_p0.5_s1")] == [
        "new"
    ] * 3
    assert "3 cells to run (0 stale), 2 finished; estimated" in out
    # A fresh folder: nothing is created at all.
    fresh = {**bench_settings, "out": str(tmp_path / "fresh" / "bench")}
    config.write_text(yaml.safe_dump(fresh), encoding="utf-8")
    assert main(["bench", str(config), "--dry-run"]) == 0
    assert not (tmp_path / "fresh").exists()
    assert "5 cells to run (0 stale), 0 finished" in capsys.readouterr().out


def test_dry_run_charges_a_cached_selection_stage_once(bench_settings: dict[str, Any]) -> None:
    from speccore.bench.estimate import estimate_bench

    bench_settings.update(methods=["staff"], seeds=[0, 1], full=False, zero_shot=False)
    shared = {c.name: c for c in estimate_bench(bench_config_from_dict(bench_settings))["cells"]}
    # The first staff cell pays the small fine-tune and scoring, the second only verification.
    assert shared["staff_p0.5_s0"].select_s > shared["staff_p0.5_s1"].select_s > 0
    assert all(c.train_s > 0 and c.nll_s > 0 and c.generate_s > 0 for c in shared.values())
    per_seed = estimate_bench(
        bench_config_from_dict({**bench_settings, "selection_seeds": "per_seed"})
    )
    _, second = per_seed["cells"]
    # Per seed, each seed fine-tunes its own small model: both pay it.
    assert second.select_s > shared["staff_p0.5_s1"].select_s
