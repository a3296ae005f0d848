"""Peak memory above what is allocated before a call, on CPU and CUDA (benchmarks and the demo).

CUDA: the caching allocator's peak counter. CPU: torch has no such counter, so the call runs under
torch.profiler with ``profile_memory=True`` and the peak of the running sum of its allocation events is
taken (allocations made by torch's CPU allocator; numpy or Python objects are not counted)."""
from __future__ import annotations

import os

import torch


def peak_memory_above(fn, device) -> tuple[object, int]:
    """Run ``fn()`` once; return (its result, peak bytes allocated above the state before the call)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        return out, torch.cuda.max_memory_allocated(dev) - base
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
    return out, peak
