"""``mmalign train --precompute-reference OUT``: the reference log-probs of every pair, once, before training
(the DAMO and RLAIF-V recipe), as a resumable, sharded job (the work-file mechanism of ``mmalign hardness``
and ``mmalign bdhs``, :mod:`mmalign.jobs`): a progress bar, a kill loses at most the batch in flight, a
rerun resumes where it stopped, ``torchrun`` splits the pairs over the ranks (the last one to finish
writes OUT).

The model runs in the precision training will give the policy (a DeepSpeed JSON's or the flags'), so that
the first step's log-ratios are exactly 0. OUT is the canonical dataset with ``ref_chosen_logp`` and
``ref_rejected_logp``; records that cannot be read or encoded go to ``OUT.failed.jsonl`` with the reason.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import data, jobs
from ..prompts import PromptEncoder, load_model
from .batches import encode_pair, pair_logps
from .trainer import TrainConfig, autocast_dtype, cast_like_training, deepspeed_config, forward_precision, \
    train_device, training_dtype


def precompute_reference(cfg: TrainConfig, out: str, *, model=None, processor=None, batch_size: int = 8,
                         shard: str | None = None, overwrite: bool = False, keep_work: bool = False) -> int | None:
    """Write ``out`` (.jsonl or .parquet): ``cfg.data`` with ``ref_chosen_logp``/``ref_rejected_logp`` from the
    model as it is now. ``shard`` "I/N" (default: torchrun's RANK/WORLD_SIZE, else all). Returns the number of
    pairs written by the process that merged, None in the others."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not cfg.data:
        raise ValueError("data: give a preference dataset")
    out = jobs.check_output(out, overwrite)
    ds = deepspeed_config(cfg)
    dtype, autocast = training_dtype(ds), autocast_dtype(ds)
    if model is None:
        model, processor = load_model(cfg.model, str(train_device(cfg)), dtype)
        cast_like_training(model, dtype, autocast)
    elif processor is None:
        raise ValueError("processor: give the model's processor (or tokenizer) with the model")
    model.eval()
    encoder = PromptEncoder(processor, template=cfg.prompt_template, images=cfg.images, device=model.device,
                            dtype=next(model.parameters()).dtype)
    params = {**jobs.input_params(cfg.data, layout=cfg.layout, columns=cfg.columns, split=None, images=cfg.images),
              "model": cfg.model or type(model).__name__, "template": cfg.prompt_template,
              "max_length": cfg.max_length, "dtype": str(next(model.parameters()).dtype),
              "autocast": None if autocast is None else str(autocast)}
    read = lambda: data.iter_records(cfg.data, layout=cfg.layout, columns=cfg.columns)  # noqa: E731
    work = jobs.run_records(jobs.JobSpec(
        name="reference", input=str(cfg.data), out=out, shard=jobs.Shard.parse(shard), params=params, read=read,
        process=lambda batch: _process(batch, model, encoder, cfg, autocast), batch_size=batch_size,
        progress=cfg.progress))
    if work is None:
        return None
    return _merge(read(), out, work, keep_work)


def _process(batch, model, encoder: PromptEncoder, cfg: TrainConfig, autocast) -> list[dict]:
    results, recs, examples = jobs.prepare(batch, lambda rec: encode_pair(rec, encoder, cfg.max_length))
    if examples:
        with torch.no_grad(), forward_precision(model.device, autocast):
            rc, rr = pair_logps(model, examples)
        for rec, c, r in zip(recs, rc.tolist(), rr.tolist()):
            results.append({"index": rec.index, "status": "ok", "id": rec.id, "ref_chosen_logp": c,
                            "ref_rejected_logp": r})
    return sorted(results, key=lambda r: r["index"])


def _merge(records, out: Path, work: jobs.WorkDir, keep_work: bool) -> int:
    rows, failures = [], []
    for rec, res in jobs.join_results(records, work.all_results(), work):
        if res["status"] != "ok":
            failures.append(res)
            continue
        row = rec.canonical()
        row.update(ref_chosen_logp=res["ref_chosen_logp"], ref_rejected_logp=res["ref_rejected_logp"])
        rows.append(row)
    jobs.write_rows(out, rows)
    failed = jobs.write_failed(out, failures)
    if failed:
        import sys

        print(f"reference: {len(failures)} records skipped, reasons in {failed}", file=sys.stderr)
    if not keep_work:
        work.remove()
    return len(rows)
