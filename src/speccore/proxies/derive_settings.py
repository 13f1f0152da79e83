"""The settings of a derived small model (:class:`DeriveSettings`) and the checks of its layer
count, shared by the derivation, the layer choice and the healing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..utils.errors import ConfigError

LayerSelection = Literal["uniform", "block-influence"]
HealMode = Literal["full", "lora"]

LAYER_SELECTIONS: tuple[str, ...] = ("uniform", "block-influence")


HEAL_MODES: tuple[str, ...] = ("full", "lora")


@dataclass(frozen=True)
class DeriveSettings:
    """Every setting that decides what :func:`derive_model` builds (all in the cache key).

    ``layers``: a count ``N >= 1`` or a fraction ``0 < f < 1`` of the target's layers
    (``round(f * L)``, at least 2). ``bi_rows``: rows (a seeded sample) whose response tokens
    measure block influence. Healing: ``heal_steps`` AdamW steps of ``heal_batch_size`` rows at
    peak rate ``heal_lr`` (linear warm-up over the first 10 %, then cosine decay), gradients
    clipped to norm 1; ``heal_mode`` ``full`` trains every parameter of the kept blocks, ``lora``
    a rank-``heal_lora_r`` adapter on them (alpha ``2r``, no dropout) merged into the weights
    afterwards. ``seed`` seeds every random choice (row samples, batch order, LoRA init).

    **Defaults: a third of the layers, evenly spaced, healed 48 steps at 2e-4**, from the
    measurement of ``speed-bench/derive_agreement.py`` (``speed-bench/results/derive_agreement.md``:
    UI translation, 100 rows, both models untuned, K = 10, on the 2-core CPU; cost: seconds per
    row of STAFF's small-model work, a LoRA fine-tune epoch and a scoring pass, over the
    target's, timed side by side):

    ===================================  ========  ======  =========  ==========  ======
    small → target                       ρ effort  ρ loss  RI effort  cost ratio  heal s
    ===================================  ========  ======  =========  ==========  ======
    SmolLM2-135M → Gemma-3-270M (cross)  0.51      0.55    0.74       0.61        -
    Gemma 1/2 uniform → Gemma            0.43      0.15    0.76       0.81        -
    Gemma 1/2 block-influence → Gemma    0.11      0.34    0.75       0.81        -
    Gemma 1/2 uniform, healed 48 steps   0.62      0.44    0.77       0.81        629
    SmolLM2 1/2 uniform → SmolLM2        0.31      0.25    0.61       0.54        -
    SmolLM2 1/2 block-influence          0.50      0.43    0.66       0.54        -
    SmolLM2 1/2 uniform, healed 48       0.72      0.60    0.76       0.54        278
    Gemma 1/3 uniform, healed 48         0.67      0.58    0.76       0.72        607
    SmolLM2 1/3 uniform, healed 48       0.69      0.50    0.75       0.40        223
    Gemma 1/3 block-influence, healed 48 0.70      0.60    0.76       0.72        508
    SmolLM2 1/3 block-infl., healed 48   0.73      0.66    0.75       0.40        182
    ===================================  ========  ======  =========  ==========  ======

    On DialogSum (100 rows, prompts about three times as long): SmolLM2 → Gemma 0.44 / 0.82
    (ρ effort / ρ loss), cost 0.64; Gemma's third unhealed 0.25 / 0.28, healed 48 steps 0.57 /
    0.55 (cost 0.56, heal 1434 s); SmolLM2's third unhealed 0.12 / 0.32, healed 0.46 / 0.37
    (cost 0.45, heal 417 s). In the UI mini bench (p = 0.9, 3 seeds) STAFF with Gemma's healed
    third agreed with Gemma better than with SmolLM2 (ρ 0.75 vs 0.59 on the verified rows) but
    its coresets trained no better (staff-derived − staff: ROUGE-L -0.81 [-1.60, +0.00],
    reference NLL +0.034 [+0.028, +0.040]); see ``quality-bench/results/mini-uitrans``.

    Why these defaults:

    * **Healing on.** Without it a derived model is not worth its cost: its per-token KL to the
      target is 9.6 nats (SmolLM2's half) and 21.4 (Gemma's), and its effort ranks rows
      unlike the target's (Spearman 0.31 and 0.43), below the cross-family SmolLM2 (0.51).
      48 steps of 8 rows bring the KL to 2.1 and 1.4 and the Spearman of effort to 0.72 and
      0.62, above the cross-family pair. Four times as long (192 steps, 904 s) took
      SmolLM2's third further, to KL 0.61 and Spearman 0.79 (effort) and 0.86 (loss), from
      0.69 and 0.50: longer healing pays in agreement (not measured on Gemma, whose 192 steps
      would take ~40 min here, nor in the bench). Healing needs the task's rows (``select``
      and ``agree`` pass them; ``speccore derive`` takes ``--data``, or ``--heal-steps 0`` for
      an unhealed model).
    * **Its cost is fixed, not per row**, and large on a small task: 278 s (SmolLM2) and 629 s
      (Gemma, whose 262k-entry vocabulary the KL runs over) here, against 1.8 s and 2.9 s per
      row of the whole target's own fine-tune + scoring. Against the target doing that work
      itself, a derived third saves 1.08 s (SmolLM2) and 0.81 s (Gemma) per row (a half 0.82
      and 0.54), so its healing (223 s and 607 s) breaks even at about 210 and 750 rows (halves:
      340 and 1,160); the derived folder is cached, so another run or pruning rate does not pay
      it again.
    * **A third of the layers, uniform.** Healed, Gemma's third agrees with Gemma better than
      its half does (effort 0.67 vs 0.62, loss 0.58 vs 0.44) at 0.72 of its cost instead of
      0.81; SmolLM2's third agrees a little less than its half (0.69 vs 0.72, loss 0.50 vs
      0.60: within the noise of 100 rows on effort) at 0.40 instead of 0.54. A third is the
      better trade-off on both, and on a 7B target it costs 0.36 against 0.51.
    * **Uniform, for now.** Block influence was erratic unhealed (better for SmolLM2, far worse
      on effort for Gemma). Healed, it did a little better than uniform on UI for both targets
      (effort 0.73 vs 0.69 and 0.70 vs 0.67, loss 0.66 vs 0.50 and 0.60 vs 0.58, KL after
      healing 1.4 vs 2.2 and 0.9 vs 1.3), mostly within the noise of 100 rows (about 0.07), and
      it was not measured healed on DialogSum; it also costs a target pass over ``bi_rows``.
      One task is not enough to change the default (and the bench cells made with it).
    * **Cost scales with the target.** Gemma 3's lm_head is 63% of a response token's FLOPs, so
      its half costs 0.81 of it (on paper 0.81); SmolLM2's half 0.54 (on paper 0.50-0.61). A 7B
      target of 32 layers spends 2% of its FLOPs in the lm_head: its half costs about 0.51 per
      token, a third 0.36 (from FLOPs; ``derive_agreement.on_paper``).
    """

    layers: int | float = 1 / 3
    layer_selection: LayerSelection = "uniform"
    heal_steps: int = 48
    heal_lr: float = 2e-4
    heal_mode: HealMode = "full"
    heal_batch_size: int = 8
    heal_lora_r: int = 16
    bi_rows: int = 256
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of range."""
        _check_layers(self.layers)
        if self.layer_selection not in LAYER_SELECTIONS:
            raise ConfigError(
                f"--layer-selection must be one of {', '.join(LAYER_SELECTIONS)}, "
                f"got {self.layer_selection!r}"
            )
        if self.heal_mode not in HEAL_MODES:
            raise ConfigError(
                f"--heal-mode must be one of {', '.join(HEAL_MODES)}, got {self.heal_mode!r}"
            )
        if self.heal_steps < 0:
            raise ConfigError(f"--heal-steps must be >= 0, got {self.heal_steps}")
        if not (self.heal_lr > 0 and math.isfinite(self.heal_lr)):
            raise ConfigError(f"--heal-lr must be > 0, got {self.heal_lr}")
        if self.heal_batch_size < 1:
            raise ConfigError(f"heal batch size must be >= 1, got {self.heal_batch_size}")
        if self.heal_lora_r < 1:
            raise ConfigError(f"heal LoRA rank must be >= 1, got {self.heal_lora_r}")
        if self.bi_rows < 1:
            raise ConfigError(f"block-influence rows must be >= 1, got {self.bi_rows}")

    @property
    def needs_data(self) -> bool:
        return self.layer_selection == "block-influence" or self.heal_steps > 0


def _check_layers(layers: int | float) -> None:
    if isinstance(layers, bool) or not isinstance(layers, int | float):
        raise ConfigError(f"--layers must be a count >= 1 or a fraction in (0, 1), got {layers!r}")
    if isinstance(layers, float) and not layers.is_integer():
        if not 0 < layers < 1:
            raise ConfigError(
                f"--layers {layers}: a fraction must lie in (0, 1); a count must be a whole number"
            )
    elif layers < 1:
        raise ConfigError(f"--layers must be a count >= 1 or a fraction in (0, 1), got {layers}")


def parse_layers(text: str, where: str = "--layers") -> int | float:
    """``"10"`` → 10 (a count), ``"0.33"`` → 0.33 (a fraction); range checks are
    :func:`layer_count`'s. ``where`` names the flag or spec in the error."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"{where}: layers {text!r} is not a number; write a fraction such as 0.33 or a "
            "count such as 10"
        ) from None
    if value.is_integer() and not text.strip().lstrip("+-").isdigit():
        # "1.0" reads as a fraction (all layers) to some and as one layer to others.
        raise ConfigError(
            f"{where}: layers {text!r} is ambiguous; write {int(value)} for {int(value)} "
            f"layer{'s' if int(value) != 1 else ''} (a count), or a fraction below 1 such as 0.5"
        )
    return int(value) if value.is_integer() else value
