"""What a small model costs next to its target: FLOPs per token on paper (:class:`Arch`) and the
ratios of measured per-row costs (``speed-bench/derive_agreement.py`` times them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: (task, model, layers) → seconds per row of "finetune_s_per_row" and "score_s_per_row".
Costs = dict[tuple[str, str, int], dict[str, float]]


def per_row(cost: dict[str, float]) -> float:
    """STAFF's small-model work per row: one fine-tune epoch (T = 1) and one scoring pass."""
    return cost["finetune_s_per_row"] + cost["score_s_per_row"]


def measured_cost_ratio(costs: Costs, row: dict[str, Any]) -> float | None:
    """Small over target (fine-tune + scoring) per row of an agreement row (``task``, ``small``,
    ``target``, ``layers`` as "small/target"), from side-by-side timings; None if not timed. A
    derived small model is timed as its target at fewer layers; a cross-family one as itself."""
    small_layers, total = (int(x) for x in row["layers"].split("/"))
    if row["small"].startswith("derive"):
        small_key = (row["task"], row["target"], small_layers)
    else:  # cross-family: the other target, whole
        small_key = (row["task"], row["small"], small_layers)
    target_key = (row["task"], row["target"], total)
    if small_key not in costs or target_key not in costs:
        return None
    return per_row(costs[small_key]) / per_row(costs[target_key])


def cost_table(costs: Costs, score_rows: int, finetune_rows: int) -> list[str]:
    """Milliseconds per row, measured one model after the other in one process, alone."""
    lines = [
        "## Cost measured side by side",
        "",
        f"Each model timed alone on the 2 cores, one after the other, on one seeded sample: "
        f"effort + loss scoring of {score_rows} rows and a LoRA fine-tune (r = 8, batch 8) "
        f"of {finetune_rows} rows, each after a warm-up. Derived models unhealed (healing changes "
        "weights, not cost). ratio: (fine-tune + scoring) per row over the whole target's.",
        "",
        "| task | model | layers | fine-tune ms/row | scoring ms/row | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (task, target, layers), c in sorted(
        costs.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])
    ):
        whole = max(k[2] for k in costs if k[:2] == (task, target))
        ratio = per_row(c) / per_row(costs[(task, target, whole)])
        lines.append(
            f"| {task} | {target} | {layers} | {1000 * c['finetune_s_per_row']:.0f} "
            f"| {1000 * c['score_s_per_row']:.0f} | {ratio:.2f} |"
        )
    return lines


@dataclass(frozen=True)
class Arch:
    """What a decoder's matmul FLOPs per token depend on (Llama/Gemma-style: gated MLP)."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    def layer_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * self.hidden * q_out + 2 * self.hidden * kv_out  # q, o; k, v
        return attention + 3 * self.hidden * self.intermediate

    def flops(self, layers: int, lm_head: bool) -> float:
        """Forward matmul FLOPs (2 per multiply-add) of one token through ``layers`` layers,
        and through the lm_head when its logits are needed (response tokens; speccore skips
        the prompt's). Attention scores are left out: short rows, small next to these."""
        head = self.hidden * self.vocab if lm_head else 0
        return 2.0 * (layers * self.layer_params() + head)


#: The two packaged targets (their configs) and a 7B target of 32 layers (Llama-2-7B's shape).
ARCHS = (
    Arch("gemma-3-270m", 640, 2048, 4, 1, 256, 18, 262_144),
    Arch("smollm2-135m", 576, 1536, 9, 3, 64, 30, 49_152),
    Arch("llama-2-7b", 4096, 11_008, 32, 32, 128, 32, 32_000),
)


def on_paper() -> list[str]:
    """What keeping 1/2 or 1/3 of the layers saves per token, from FLOPs alone."""
    lines = [
        "## On paper: forward FLOPs per token of a derived model / its target",
        "",
        "Matmul FLOPs; a response token also goes through the lm_head (the prompt's logits are",
        "never computed). Fine-tuning and effort add a backward pass of about twice the forward",
        "through the same matrices, so the ratios hold for them too.",
        "",
        "| target | layers | GFLOP/response token | 1/2 layers | 1/3 layers | prompt token: 1/2 | 1/3 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for a in ARCHS:
        full, half, third = a.layers, round(a.layers / 2), round(a.layers / 3)
        resp, prompt = a.flops(full, True), a.flops(full, False)
        lines.append(
            f"| {a.name} | {full} | {resp / 1e9:.3f} | {a.flops(half, True) / resp:.2f} "
            f"| {a.flops(third, True) / resp:.2f} | {a.flops(half, False) / prompt:.2f} "
            f"| {a.flops(third, False) / prompt:.2f} |"
        )
    smol, gemma = ARCHS[1], ARCHS[0]
    lines += [
        "",
        "Gemma 3's 262k-entry lm_head is 63% of its FLOPs per response token, so halving its",
        "layers saves only 19% there (prompt tokens: 50%); SmolLM2's lm_head is 21%, a 7B",
        "model's 2%: at 7B a derived model costs what its share of layers says. The cross-family",
        "small model SmolLM2-135M costs "
        f"{smol.flops(smol.layers, True) / gemma.flops(gemma.layers, True):.2f} of Gemma-3-270M per "
        f"response token but {smol.flops(smol.layers, False) / gemma.flops(gemma.layers, False):.2f}"
        " per prompt token (its 30 layers hold 106M parameters, Gemma's 18 hold 100M).",
    ]
    return lines
