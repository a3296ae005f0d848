"""``mmalign train --precompute-reference OUT``: the reference log-probs of every pair, once, before training
(the DAMO and RLAIF-V recipe), as a resumable, sharded job (the work-file mechanism of ``mmalign hardness``
and ``mmalign bdhs``, :mod:`mmalign.jobs`): a progress bar, a kill loses at most the batch in flight, a
rerun resumes where it stopped, ``torchrun`` splits the pairs over the ranks (the last one to finish
writes OUT).

The model runs in the precision training will give the policy (a DeepSpeed JSON's or the flags'), so that
the first step's log-ratios are exactly 0. OUT is the canonical dataset with ``ref_chosen_logp`` and
``ref_rejected_logp``, and ``ref_config``: what else those numbers depend on (model, prompt template,
max_length, precision), which the trainer compares with its own settings (:func:`check_reference_config`).
Records that cannot be read or encoded go to ``OUT.failed.jsonl`` with the reason.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import data, devices, jobs
from ..models import PromptEncoder, load_model
from .batches import encode_pair, pair_logps
from .config import TrainConfig
from .runtime import autocast_dtype, cast_like_training, deepspeed_config, forward_precision, train_device, \
    training_dtype


def precompute_reference(cfg: TrainConfig, out: str, *, model=None, processor=None, batch_size: int = 8,
                         shard: str | None = None, overwrite: bool = False, keep_work: bool = False) -> int | None:
    """Write ``out`` (.jsonl or .parquet): ``cfg.data`` with ``ref_chosen_logp``/``ref_rejected_logp`` from the
    model as it is now. ``shard`` "I/N" (default: torchrun's RANK/WORLD_SIZE, else all). Returns the number of
    pairs written by the process that merged, None in the others."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not cfg.data:
        raise ValueError("data: give a preference dataset")
    devices.check_device(cfg.device)
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
    stamp = reference_config(cfg, dtype, autocast)
    params = {**jobs.input_params(cfg.data, layout=cfg.layout, columns=cfg.columns, split=None, images=cfg.images),
              **stamp, "model": cfg.model or type(model).__name__}
    read = lambda: data.iter_records(cfg.data, layout=cfg.layout, columns=cfg.columns)  # noqa: E731
    work = jobs.run_records(jobs.JobSpec(
        name="reference", input=str(cfg.data), out=out, shard=jobs.Shard.parse(shard), params=params, read=read,
        process=lambda batch: _process(batch, model, encoder, cfg, autocast), batch_size=batch_size,
        progress=cfg.progress))
    if work is None:
        return None
    return _merge(read(), out, work, keep_work, stamp)


def reference_config(cfg: TrainConfig, dtype: torch.dtype, autocast: torch.dtype | None) -> dict:
    """What a sequence's reference log-prob depends on besides the pair itself."""
    return {"model": str(Path(cfg.model).resolve()) if cfg.model else None, "prompt_template": cfg.prompt_template,
            "max_length": cfg.max_length, "dtype": str(dtype).replace("torch.", ""),
            "autocast": None if autocast is None else str(autocast).replace("torch.", "")}


def check_reference_config(records, cfg: TrainConfig, dtype: torch.dtype, autocast: torch.dtype | None) -> None:
    """Precomputed reference log-probs (records with ``ref_config``) made with another prompt template or
    max_length are those of other sequences: ValueError naming the record. Another model path or precision:
    a warning (the same weights may live elsewhere; the log-ratios then start near 0, not at 0)."""
    want, differ = reference_config(cfg, dtype, autocast), {}
    for rec in records:
        got = rec.extra.get("ref_config")
        if not isinstance(got, dict):
            continue  # reference log-probs from elsewhere: nothing to compare
        for key in ("prompt_template", "max_length"):
            if got.get(key) != want[key]:
                raise ValueError(f"reference='precomputed': {rec.where()} has reference log-probs computed with "
                                 f"{key}={got.get(key)!r} and this run has {key}={want[key]!r}: they are the "
                                 "log-probs of other sequences; rerun `mmalign train --precompute-reference` with "
                                 "this run's settings")
        differ.update({k: got.get(k) for k in ("model", "dtype", "autocast") if got.get(k) != want[k]})
    if differ:
        import warnings

        warnings.warn(f"reference='precomputed': the reference log-probs were computed with "
                      f"{', '.join(f'{k}={v!r}' for k, v in differ.items())}; this run has "
                      f"{', '.join(f'{k}={want[k]!r}' for k in differ)}", stacklevel=2)


def _process(batch, model, encoder: PromptEncoder, cfg: TrainConfig, autocast) -> list[dict]:
    results, recs, examples = jobs.prepare(batch, lambda rec: encode_pair(rec, encoder, cfg.max_length))
    if examples:
        with torch.no_grad(), forward_precision(model.device, autocast):
            rc, rr = pair_logps(model, examples)
        for rec, c, r in zip(recs, rc.tolist(), rr.tolist()):
            results.append({"index": rec.index, "status": "ok", "id": rec.id, "ref_chosen_logp": c,
                            "ref_rejected_logp": r})
    return sorted(results, key=lambda r: r["index"])


def _merge(records, out: Path, work: jobs.WorkDir, keep_work: bool, stamp: dict) -> int:
    rows, failures = [], []
    for rec, res in jobs.join_results(records, work.all_results(), work):
        if res["status"] != "ok":
            failures.append(res)
            continue
        row = rec.canonical()
        row.update(ref_chosen_logp=res["ref_chosen_logp"], ref_rejected_logp=res["ref_rejected_logp"], ref_config=stamp)
        rows.append(row)
    jobs.write_rows(out, rows)
    failed = jobs.write_failed(out, failures)
    if failed:
        import sys

        print(f"reference: {len(failures)} records skipped, reasons in {failed}", file=sys.stderr)
    if not keep_work:
        work.remove()
    return len(rows)
