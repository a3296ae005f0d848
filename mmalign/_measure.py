"""Memory a call allocates, on CPU and CUDA (benchmarks and the demo): its peak above what was allocated
before it, and what it leaves allocated when it returns.

CUDA: the caching allocator's counters. CPU: torch has no such counter, so the call runs under
torch.profiler with ``profile_memory=True`` and the running sum of its allocation events is walked
(allocations made by torch's CPU allocator; numpy or Python objects are not counted)."""
from __future__ import annotations

import gc
import os

import torch


def _measured(fn, device) -> tuple[object, int, int]:
    """Run ``fn()`` once: (its result, peak bytes above the state before, bytes still allocated after).
    Unreachable objects are collected first: freed inside the window, their tensors would count against
    ``fn`` (a previous trainer's models collected during the next one's construction)."""
    gc.collect()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return out, torch.cuda.max_memory_allocated(dev) - base, torch.cuda.memory_allocated(dev) - base
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return out, peak, running


def peak_memory_above(fn, device) -> tuple[object, int]:
    """Run ``fn()`` once; return (its result, peak bytes allocated above the state before the call)."""
    out, peak, _ = _measured(fn, device)
    return out, peak


def memory_left(fn, device) -> tuple[object, int]:
    """Run ``fn()`` once; return (its result, bytes it allocated that are still allocated when it returns):
    what an object built by ``fn`` holds (a trainer's models, optimizer state, buffers)."""
    out, _, left = _measured(fn, device)
    return out, left
