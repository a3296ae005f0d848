"""Data-parallel DAMO step: two gloo processes agree on the mask and the running mean, and their losses
sum to the single-process loss of the global batch (SPEC.md section 3, "Batches, ranks and accumulation")."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmalign.functional as F

N_LOCAL, WORLD = 8, 2


def _global_batch():
    g = torch.Generator().manual_seed(1234)
    logps = [-20 + 3 * torch.randn(N_LOCAL * WORLD, generator=g, dtype=torch.float64) for _ in range(4)]
    alpha_d = 0.5 + torch.rand(N_LOCAL * WORLD, generator=g, dtype=torch.float64)
    return logps, alpha_d


def _worker(rank, path, results):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        logps, alpha_d = _global_batch()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        local = [t[sl].clone().requires_grad_() for t in logps]
        running_mean = torch.tensor(0.1)
        out = F.damo_step(*local, running_mean, alpha_d=alpha_d[sl], seed=5, step=9, inplace=True)
        out.loss.backward()
        results[rank] = dict(keep=out.metrics.keep.tolist(), g=running_mean.item(), loss=out.loss.item(),
                             grads=[t.grad.tolist() for t in local], alpha_m=out.metrics.alpha_m.item())
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=WORLD, join=True)
        results = dict(results)
    logps, alpha_d = _global_batch()
    logps = [t.clone().requires_grad_() for t in logps]
    single = F.damo_step(*logps, torch.tensor(0.1), alpha_d=alpha_d, seed=5, step=9)
    single.loss.backward()

    assert results[0]["g"] == results[1]["g"] == single.running_mean.item()
    assert results[0]["alpha_m"] == results[1]["alpha_m"]
    torch.testing.assert_close(results[0]["alpha_m"], single.metrics.alpha_m.item())
    assert results[0]["keep"] + results[1]["keep"] == single.metrics.keep.tolist()
    torch.testing.assert_close(results[0]["loss"] + results[1]["loss"], single.loss.item())
    for k in range(4):
        torch.testing.assert_close(torch.tensor(results[0]["grads"][k] + results[1]["grads"][k], dtype=torch.float64),
                                   logps[k].grad)
