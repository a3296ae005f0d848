"""The optimizer and its schedule: parameter groups with their own learning rate and weight decay (the study trains
the projector at its own rate), AdamW, and a warm-up (steps or a share of the run) followed by a cosine or linear
decay to 0 at the last step, or a constant rate."""
from __future__ import annotations

import fnmatch
import math
from typing import Callable

import torch

from ..models import adapter_for
from .config import ROLES, TrainConfig
from .policy import role_of

_PEFT_PREFIX = "base_model.model."


def _spec(group: dict) -> list[str]:
    params = group["params"]
    return [params] if isinstance(params, str) else list(params)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """torch optimizer groups over the trainable parameters: one per ``cfg.param_groups`` entry (roles or
    parameter-name patterns, first match wins; ``name`` is its spec) with its lr / weight_decay, then the rest at
    ``cfg.lr`` / ``cfg.weight_decay`` (name "rest"). A group that matches no trainable parameter raises."""
    roles = adapter_for(model).roles()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    taken: set[int] = set()
    groups = []
    for i, group in enumerate(cfg.param_groups or []):
        spec = _spec(group)
        params = []
        for name, p in named:
            plain = name.removeprefix(_PEFT_PREFIX).replace(".modules_to_save.default", "")
            role = role_of(plain, roles)
            if id(p) not in taken and any(s == role if s in ROLES else fnmatch.fnmatchcase(plain, s) for s in spec):
                params.append(p)
                taken.add(id(p))
        if not params:
            raise ValueError(f"param_groups[{i}]: {spec} matches no trainable parameter")
        groups.append({"params": params, "name": ",".join(spec), "lr": float(group.get("lr", cfg.lr)),
                       "weight_decay": float(group.get("weight_decay", cfg.weight_decay))})
    rest = [p for _, p in named if id(p) not in taken]
    if rest:
        groups.append({"params": rest, "name": "rest", "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return groups


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return math.ceil(cfg.warmup_ratio * total) if cfg.warmup_ratio is not None else cfg.warmup_steps


def lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """The factor of each group's lr at optimizer step ``s`` (0-based): (s + 1) / W during the W warm-up steps,
    then 1 (constant), or a cosine / linear decay with progress p = (s - W) / (total - W): (1 + cos(pi p)) / 2,
    1 - p (the shapes of Hugging Face's schedules)."""
    warm, kind = warmup_steps(cfg, total), cfg.scheduler

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1.0 - progress)

    return factor


def optimizer(groups: list[dict], cpu_adam: bool) -> torch.optim.Optimizer:
    """AdamW over ``groups``: DeepSpeed's CPU Adam for ZeRO-Offload on a GPU machine, else torch's fused AdamW (one
    kernel per step, no full-size temporaries: foreach's took 4 bytes per parameter)."""
    plain = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(plain, adamw_mode=True)
    return torch.optim.AdamW(plain, fused=True)
