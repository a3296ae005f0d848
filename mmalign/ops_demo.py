"""``mmalign ops-demo``: the fused log-prob ops against eager PyTorch on this machine, with numbers.

Eager is what DPO trainers run today (TRL, the released DAMO code): ``log_softmax`` of fp32 logits,
then ``gather`` of the labels. Shapes are small enough for 2 CPU cores and a few seconds."""
from __future__ import annotations

import time

import torch

from . import functional as F
from ._measure import peak_memory_above


def eager_sequence_logps(logits, labels, ignore_index=-100):
    """The eager recipe of DPO trainers: fp32 log_softmax over the vocabulary, gather, masked sum."""
    mask = labels != ignore_index
    logp = logits.float().log_softmax(-1).gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def _fwd_bwd(fn, *leaves):
    def run():
        out = fn()
        out.sum().backward()
        return out.detach()

    def clear():
        for t in leaves:
            t.grad = None
    run.clear = clear
    return run


def _measure(run, device, repeats=3):
    run()  # warm-up
    run.clear()
    out, mem = peak_memory_above(run, device)
    times = []
    for _ in range(repeats):
        run.clear()
        t0 = time.perf_counter()
        run()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2], mem


def _row(name, out, ref, sec, mem, base):
    err = (out.double() - ref.double()).abs().max().item()
    speed = f"{base[0] / sec:5.2f}x" if base else "  1.00x"
    memr = f"{mem / base[1]:5.2f}x" if base and base[1] else "  1.00x"
    return f"  {name:<34} max|diff| {err:8.1e}   {sec * 1e3:8.1f} ms  {speed}   {mem / 2**20:8.1f} MiB  {memr}"


def run(device: str = "cpu", seed: int = 0, sizes: tuple[int, int, int, int] = (4, 256, 32000, 256)) -> str:
    """Compare both ops with eager at (B, T, V, H) = ``sizes``; returns the printed table."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, H = sizes
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lines = [f"device {device}, dtype {dtype}; time = median fwd+bwd, memory = peak above inputs", ""]

    logits = torch.randn(B, T, V, generator=g).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    labels[:, : T // 4] = -100  # prompt positions
    lines.append(f"sequence_logps: logits ({B}, {T}, {V})")
    ref, *base = _measure(_fwd_bwd(lambda: eager_sequence_logps(logits, labels), logits), device)
    lines.append(_row("eager log_softmax+gather", ref, ref, *base, None))
    out, *m = _measure(_fwd_bwd(lambda: F.sequence_logps(logits, labels), logits), device)
    lines.append(_row("mmalign.sequence_logps", out, ref, *m, base))

    hidden = torch.randn(B, T, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype).requires_grad_()
    resp = torch.randint(0, V, (B, T), generator=g).to(device)
    resp[:, : T // 2] = -100  # half the sequence is prompt + image tokens
    lines += ["", f"fused_linear_sequence_logps: hidden ({B}, {T}, {H}), weight ({V}, {H}), half the labels ignored"]
    ref, *base = _measure(_fwd_bwd(lambda: eager_sequence_logps(hidden @ weight.T, resp), hidden, weight), device)
    lines.append(_row("eager matmul+log_softmax+gather", ref, ref, *base, None))
    out, *m = _measure(_fwd_bwd(lambda: F.fused_linear_sequence_logps(hidden, weight, resp), hidden, weight), device)
    lines.append(_row("mmalign.fused_linear_sequence_logps", out, ref, *m, base))
    return "\n".join(lines)
