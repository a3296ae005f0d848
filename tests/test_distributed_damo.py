"""Data-parallel DAMO step: two gloo processes given the group agree on the mask and the running mean, and their
losses sum to the single-process loss of the global batch (docs/math.md section 3, "Batches, ranks and accumulation");
without a group, nothing communicates, even with torch.distributed initialized."""
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mmalign.functional as F
from mmalign.nn import DAMOLoss

N_LOCAL, WORLD = 8, 2


def _global_batch():
    g = torch.Generator().manual_seed(1234)
    logps = [-20 + 3 * torch.randn(N_LOCAL * WORLD, generator=g, dtype=torch.float64) for _ in range(4)]
    alpha_d = 0.5 + torch.rand(N_LOCAL * WORLD, generator=g, dtype=torch.float64)
    return logps, alpha_d


def _init(rank, path):
    # a short timeout: a collective one rank never joins fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))


def _worker(rank, path, results):
    _init(rank, path)
    try:
        logps, alpha_d = _global_batch()
        sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        local = [t[sl].clone().requires_grad_() for t in logps]
        running_mean = torch.tensor(0.1)
        out = F.damo_step(*local, running_mean=running_mean, alpha_d=alpha_d[sl], seed=5, step=9, inplace=True,
                          group=dist.group.WORLD)
        out.loss.backward()
        module = DAMOLoss(0.1, seed=5, group=dist.group.WORLD)  # the module holds the group
        module.running_mean.fill_(0.1)
        module.step.fill_(9)
        held = module(*[t[sl] for t in logps], alpha_d=alpha_d[sl])
        results[rank] = dict(keep=out.keep.tolist(), g=running_mean.item(), loss=out.loss.item(),
                             grads=[t.grad.tolist() for t in local], alpha_m=out.alpha_m.item(),
                             module=(held.loss.item(), held.keep.tolist(), module.running_mean.item()))
    finally:
        dist.destroy_process_group()


def _spawn(worker, tmp_path) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / "store"), results), nprocs=WORLD, join=True)
        return dict(results)


def test_two_ranks_match_one_process(tmp_path):
    results = _spawn(_worker, tmp_path)
    logps, alpha_d = _global_batch()
    logps = [t.clone().requires_grad_() for t in logps]
    single = F.damo_step(*logps, running_mean=torch.tensor(0.1), alpha_d=alpha_d, seed=5, step=9)
    single.loss.backward()

    assert results[0]["g"] == results[1]["g"] == single.running_mean.item()
    assert results[0]["alpha_m"] == results[1]["alpha_m"]
    torch.testing.assert_close(results[0]["alpha_m"], single.alpha_m.item())
    assert results[0]["keep"] + results[1]["keep"] == single.keep.tolist()
    torch.testing.assert_close(results[0]["loss"] + results[1]["loss"], single.loss.item())
    for k in range(4):
        torch.testing.assert_close(torch.tensor(results[0]["grads"][k] + results[1]["grads"][k], dtype=torch.float64),
                                   logps[k].grad)
    for r in (0, 1):  # DAMOLoss(group=...) is the same step
        assert results[r]["module"] == (results[r]["loss"], results[r]["keep"], results[r]["g"])


def _one_rank_worker(rank, path, results):
    """Rank 0 evaluates alone (functional and module, group=None) while rank 1 waits at a barrier: a hidden
    collective would pair with that barrier and hang or fail."""
    _init(rank, path)
    try:
        if rank == 0:
            logps, alpha_d = _global_batch()
            local = [t[:N_LOCAL] for t in logps]
            out = F.damo_step(*local, running_mean=torch.tensor(0.1), alpha_d=alpha_d[:N_LOCAL], seed=5, step=9)
            module = DAMOLoss(0.1, seed=5).eval()
            module.running_mean.fill_(0.1)
            module.step.fill_(9)
            held = module(*local, alpha_d=alpha_d[:N_LOCAL])
            results[0] = dict(loss=out.loss.item(), keep=out.keep.tolist(), g=out.running_mean.item(),
                              module=held.loss.item())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_without_a_group_nothing_communicates(tmp_path):
    results = _spawn(_one_rank_worker, tmp_path)
    logps, alpha_d = _global_batch()
    alone = F.damo_step(*[t[:N_LOCAL] for t in logps], running_mean=torch.tensor(0.1), alpha_d=alpha_d[:N_LOCAL],
                        seed=5, step=9)
    assert results[0]["loss"] == alone.loss.item() == results[0]["module"]
    assert results[0]["keep"] == alone.keep.tolist() and results[0]["g"] == alone.running_mean.item()
    global_batch = F.damo_step(*logps, running_mean=torch.tensor(0.1), alpha_d=alpha_d, seed=5, step=9)
    assert results[0]["g"] != global_batch.running_mean.item()  # what a step on the global batch would give
