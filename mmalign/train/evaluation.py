"""Held-out metrics during training: the pairs of ``eval_data``, or a ``eval_fraction`` of the training data held
out (a function of the seed), scored every ``eval_every`` optimizer steps and at the end.

For each held-out pair, with the policy in eval mode and no gradient: the policy's and the reference's log-probs,
then the loss module in eval mode (DAMO's running mean used, not updated): per-pair loss, rewards
r = β·(log π - log π_ref) of chosen and rejected, margin r_w - r_l and accuracy 1[r_w > r_l] (docs/math.md §2). The
row holds their means over all held-out pairs, and over the pairs of each value of ``group_column`` when the data
carries one (``easy/margin``, ``hard/accuracy``, ...). Under data parallelism every rank scores an equal share
(padded with zero-weight repeats, so that ZeRO-3's collective forwards line up) and the sums are all-reduced."""
from __future__ import annotations

import math

import torch

from .. import data

KEYS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")


def hold_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training records, held-out records): ceil(fraction * n) records drawn by ``seed``, both in input order."""
    n = len(records)
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()[:math.ceil(fraction * n)])
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def _group(rec: data.PairRecord, column: str | None) -> str | None:
    if column is None:
        return None
    value = rec.extra.get(column)
    return None if value is None else str(value)


class HeldOut:
    """Scores the held-out pairs: ``HeldOut(records, group_column, batch_size).score(trainer)`` -> a metrics row."""

    def __init__(self, records: list, group_column: str | None, batch_size: int):
        if not records:
            raise ValueError("held-out data: no usable pairs")
        self.records, self.column, self.batch_size = records, group_column, batch_size
        self.groups = sorted({g for r in records if (g := _group(r, group_column)) is not None})

    def _share(self, rank: int, world: int) -> list[tuple[data.PairRecord, float]]:
        mine = [(r, 1.0) for r in self.records[rank::world]]
        size = math.ceil(len(self.records) / world)
        return mine + [(self.records[0], 0.0)] * (size - len(mine))

    @torch.no_grad()
    def score(self, trainer) -> dict:
        """One pass over this rank's share with ``trainer``'s policy, reference and loss module."""
        names = [None] + self.groups
        sums = torch.zeros(len(names), len(KEYS) + 1, dtype=torch.float64)  # per group: the KEYS' sums, count
        share = self._share(trainer.rank, trainer.world)
        with trainer.evaluating():
            for i in range(0, len(share), self.batch_size):
                chunk = share[i:i + self.batch_size]
                batch = [trainer.encode(rec) for rec, _ in chunk]
                m = trainer.loss_metrics(batch)
                values = torch.stack([m.losses, m.chosen_rewards, m.rejected_rewards, m.margins,
                                      m.accuracies.to(m.losses.dtype)], 1).double().cpu()
                for (rec, weight), row in zip(chunk, values):
                    for j, name in enumerate(names):
                        if name is None or _group(rec, self.column) == name:
                            sums[j, :-1] += weight * row
                            sums[j, -1] += weight
        if trainer.world > 1:
            sums = sums.to(trainer.device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        out = {"split": "eval", "pairs": int(sums[0, -1])}
        for j, name in enumerate(names):
            prefix = "" if name is None else f"{name}/"
            count = float(sums[j, -1]) or 1.0
            out.update({f"{prefix}{key}": float(sums[j, k]) / count for k, key in enumerate(KEYS)})
        return out
