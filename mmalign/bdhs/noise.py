"""The diffusion noise of BDHS's noise variant (docs/math.md §7, Eq. 8-9), on the normalized pixel tensor:

    β_k = σ(-6 + 12k/1000)·(0.5e-2 - 1e-5) + 1e-5,   ᾱ_N = Π_{k=1..N} (1 - β_k)
    x̃   = sqrt(ᾱ_N)·x + sqrt(1 - ᾱ_N)·ε,            ε ~ N(0, I),  N = 500 by default
"""
from __future__ import annotations

import math

import torch


def alpha_bar(steps: int = 500) -> float:
    """ᾱ_N of Eq. 8 (float64)."""
    if steps < 0:
        raise ValueError(f"noise_steps: expected >= 0, got {steps}")
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    beta = torch.sigmoid(-6 + 12 * k / 1000) * (0.5e-2 - 1e-5) + 1e-5
    return float(torch.prod(1 - beta))


def add_noise(pixels: torch.Tensor, steps: int = 500, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 9 with fresh ε drawn from ``generator`` (on the CPU, then moved: same noise on every device)."""
    a = alpha_bar(steps)
    eps = torch.randn(pixels.shape, generator=generator, dtype=torch.float32).to(pixels.device, pixels.dtype)
    return math.sqrt(a) * pixels + math.sqrt(1 - a) * eps
