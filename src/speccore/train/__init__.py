"""LoRA fine-tuning."""

from __future__ import annotations

from .loop import finetune, lr_factor, plan_steps, warmup_steps

__all__ = ["finetune", "lr_factor", "plan_steps", "warmup_steps"]
