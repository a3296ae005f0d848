"""The hardness job: records -> sub-sentences -> CLIP scores -> P, δ -> (merge) α_D, output, summary.

Resumable and sharded through :mod:`mmalign.jobs`. The work files hold δ, P and the CLIP scores of
every finished pair; α_D needs δ̄ over the whole dataset, so it is computed in the merge, which also
writes the output (atomically), the ``failed`` file, the summary and the δ histogram.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data, devices, jobs, plots
from .clip import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipScorer, load_scorer
from .scores import alpha_d, pair_softmax
from .split import LLMSplitter, RulesSplitter

DELTA_FIELDS = {"probs": "delta", "scores": "delta_clip_scores"}


@dataclass
class HardnessConfig:
    """Options of :func:`run` (the CLI flags of ``mmalign hardness`` map onto these one to one)."""

    images: str | None = None            # image root for relative paths
    clip_model: str = DEFAULT_MODEL      # open_clip name, model config .json, HF CLIP dir or hf:<name>
    clip_pretrained: str | None = DEFAULT_PRETRAINED  # open_clip tag or checkpoint path; None = random
    splitter: str = "rules"              # "rules" or "llm"
    llm_model: str | None = None         # local causal LM for splitter="llm"
    llm_batch_size: int = 8
    llm_max_new_tokens: int = 256
    layout: str = "auto"
    columns: dict | None = None
    split: str | None = None             # split of a saved DatasetDict
    batch_size: int = 32                 # pairs per batch (and per durable write)
    text_batch_size: int = 256
    delta: str = "probs"                 # "probs" (Eq. 5-6) or "scores" (Table 2 ablation) feeds α_D
    delta_mean: float | None = None      # δ̄; None = the mean over the dataset
    device: str | None = None            # None: cuda:LOCAL_RANK when CUDA is there, else cpu
    amp: bool = True
    seed: int = 0                        # random CLIP init (clip_pretrained=None)
    strict: bool = False                 # stop at the first bad record instead of skipping it
    shard: str | None = None             # "I/N"; None: torchrun's RANK/WORLD_SIZE, else 0/1
    overwrite: bool = False
    keep_work: bool = False
    progress: bool = True
    histogram: bool = True

    def validate(self) -> None:
        if self.splitter not in ("rules", "llm"):
            raise ValueError(f"splitter: expected 'rules' or 'llm', got {self.splitter!r}")
        if self.splitter == "llm" and not self.llm_model:
            raise ValueError("llm_model: splitter='llm' needs a local causal LM path (--llm-model)")
        if self.delta not in DELTA_FIELDS:
            raise ValueError(f"delta: expected one of {sorted(DELTA_FIELDS)}, got {self.delta!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.delta_mean is not None and not math.isfinite(self.delta_mean):
            raise ValueError(f"delta_mean: expected a finite number, got {self.delta_mean}")
        devices.check_device(self.device)


@dataclass
class Summary:
    records: int
    scored: int
    failed: int
    llm_fallbacks: int
    delta_field: str
    delta_mean: float
    delta_quantiles: dict
    alpha_d_min: float
    alpha_d_max: float
    output: str
    failed_file: str | None
    histogram: str | None = None
    extra: dict = field(default_factory=dict)

    def format(self) -> str:
        q = self.delta_quantiles
        lines = [f"pairs: {self.records} read, {self.scored} scored, {self.failed} failed"
                 + (f", {self.llm_fallbacks} responses split by the rules after malformed LLM output"
                    if self.llm_fallbacks else ""),
                 f"{self.delta_field}: mean (δ̄) {self.delta_mean:.6g}; "
                 + ", ".join(f"{k} {v:.4g}" for k, v in q.items()),
                 f"alpha_d: {self.alpha_d_min:.4g} .. {self.alpha_d_max:.4g}",
                 f"output: {self.output}"]
        if self.failed_file:
            lines.append(f"failed records: {self.failed_file}")
        if self.histogram:
            lines.append(f"histogram: {self.histogram}")
        return "\n".join(lines)


def _process(batch, scorer: ClipScorer, splitter, cfg: HardnessConfig) -> list[dict]:
    """Score one batch of records; bad records become failure results (or stop the job when strict)."""
    results, good, images = jobs.prepare(batch, lambda rec: data.open_image(rec.image, cfg.images))
    splits = splitter.split_many([r.chosen for r in good] + [r.rejected for r in good])
    pairs = []
    for i, rec in enumerate(good):
        sw, sl = splits[i], splits[len(good) + i]
        if not sw.pieces and not sl.pieces:
            results.append(jobs.failure(rec.index, rec.line, rec.id, "chosen and rejected have no sub-sentence (empty text)"))
        else:
            pairs.append((rec, images[i], sw, sl))
    jobs.stop_if_strict(results, cfg.strict)
    if pairs:
        texts, image_of_text, chosen = [], [], []
        for j, (_, _, sw, sl) in enumerate(pairs):
            for side, pieces in ((True, sw.pieces), (False, sl.pieces)):
                texts += pieces
                image_of_text += [j] * len(pieces)
                chosen += [side] * len(pieces)
        pair_of_text = torch.tensor(image_of_text, dtype=torch.int64)
        c = scorer.score([p[1] for p in pairs], texts, pair_of_text)
        ps = pair_softmax(c, pair_of_text, torch.tensor(chosen), len(pairs))
        start = 0
        for j, (rec, _, sw, sl) in enumerate(pairs):
            p, q = len(sw.pieces), len(sl.pieces)
            probs, scores = ps.probs[start:start + p + q].tolist(), c[start:start + p + q].tolist()
            start += p + q
            results.append({
                "index": rec.index, "status": "ok", "id": rec.id,
                "delta": ps.delta[j].item(), "delta_clip_scores": ps.delta_scores[j].item(),
                "chosen_subsentences": sw.pieces, "chosen_subsentence_probs": probs[:p],
                "chosen_clip_scores": scores[:p],
                "rejected_subsentences": sl.pieces, "rejected_subsentence_probs": probs[p:],
                "rejected_clip_scores": scores[p:],
                "split_fallback": [s for s, sp in (("chosen", sw), ("rejected", sl)) if sp.fallback]})
    return sorted(results, key=lambda r: r["index"])


def _params(input, cfg: HardnessConfig, scorer_desc: str, splitter_desc: str) -> dict:
    """What determines the work files' content: a resume with other values is refused."""
    return {**jobs.input_params(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split, images=cfg.images),
            "clip": scorer_desc, "seed": cfg.seed, "splitter": splitter_desc}


def run(input: str | os.PathLike, out: str | os.PathLike, config: HardnessConfig | None = None, *,
        scorer: ClipScorer | None = None, splitter=None, **overrides) -> Summary | None:
    """Run (or resume) the hardness job on ``input`` and write ``out`` (``.jsonl`` or ``.parquet``).

    Returns the :class:`Summary` when this process wrote the output, None when it finished its shard
    and others are still running (the last one to finish merges). ``scorer``/``splitter`` objects
    replace the ones the config would load (for use from Python with a model already in memory);
    ``splitter="rules"|"llm"`` sets the config field instead."""
    if isinstance(splitter, str):
        overrides["splitter"], splitter = splitter, None
    cfg = dataclasses.replace(config or HardnessConfig(), **overrides)
    cfg.validate()
    out = jobs.check_output(out, cfg.overwrite)
    device = devices.default_device(cfg.device)
    if scorer is None:
        scorer = load_scorer(cfg.clip_model, cfg.clip_pretrained, device=device, amp=cfg.amp,
                             text_batch_size=cfg.text_batch_size, seed=cfg.seed)
    if splitter is None:
        splitter = (LLMSplitter.from_pretrained(cfg.llm_model, device=device, batch_size=cfg.llm_batch_size,
                                                max_new_tokens=cfg.llm_max_new_tokens) if cfg.splitter == "llm"
                    else RulesSplitter())
    splitter_desc = (f"llm:{cfg.llm_model}:{cfg.llm_max_new_tokens}" if getattr(splitter, "name", "") == "llm"
                     else getattr(splitter, "name", "custom"))
    started = time.time()
    work = jobs.run_records(jobs.JobSpec(
        name="hardness", input=str(input), out=out, shard=jobs.Shard.parse(cfg.shard),
        params=_params(input, cfg, scorer.description, splitter_desc),
        read=lambda: data.iter_records(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split),
        process=lambda batch: _process(batch, scorer, splitter, cfg), batch_size=cfg.batch_size,
        progress=cfg.progress))
    if work is None:
        return None
    summary = merge(input, out, cfg, work)
    summary.extra["seconds_this_process"] = round(time.time() - started, 3)
    return summary


def merge(input, out: Path, cfg: HardnessConfig, work: jobs.WorkDir) -> Summary:
    """Join every shard's results with the input, compute δ̄ and α_D, write the output, the failed file,
    the summary JSON and the δ histogram; remove the work directory unless ``keep_work``."""
    results = work.all_results()
    key = DELTA_FIELDS[cfg.delta]
    deltas = [r[key] for r in results.values() if r["status"] == "ok"]
    if not deltas and cfg.delta_mean is None:
        raise jobs.JobError("no pair could be scored (see the failed records): cannot compute δ̄")
    finite = [d for d in deltas if math.isfinite(d)]
    delta_mean = cfg.delta_mean if cfg.delta_mean is not None else sum(finite) / max(len(finite), 1)
    rows, failures, fallbacks, alphas = [], [], 0, []
    records = data.iter_records(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split)
    for rec, res in jobs.join_results(records, results, work):
        if res["status"] != "ok":
            failures.append(res)
            continue
        a = alpha_d(res[key], delta_mean).item()
        alphas.append(a)
        fallbacks += len(res["split_fallback"])
        row = rec.canonical()
        row.update({k: v for k, v in res.items() if k not in ("index", "status", "split_fallback")})
        row["alpha_d"] = a
        if res["split_fallback"]:
            row["split_fallback"] = res["split_fallback"]
        rows.append(row)
    jobs.write_rows(out, rows)
    failed_file = jobs.write_failed(out, failures)
    values = torch.tensor(finite or [float("nan")], dtype=torch.float64)
    qs = torch.quantile(values, torch.tensor([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0], dtype=torch.float64)).tolist()
    summary = Summary(
        records=len(results), scored=len(rows), failed=len(failures), llm_fallbacks=fallbacks, delta_field=key,
        delta_mean=delta_mean, delta_quantiles=dict(zip(("min", "p5", "p25", "p50", "p75", "p95", "max"), qs)),
        alpha_d_min=min(alphas, default=float("nan")), alpha_d_max=max(alphas, default=float("nan")),
        output=str(out), failed_file=failed_file)
    if cfg.histogram:
        summary.histogram = _histogram(finite, out.with_name(out.stem + ".delta.png"), key, delta_mean)
    jobs.atomic_write(out.with_name(out.stem + ".summary.json"),
                      lambda f: json.dump(dataclasses.asdict(summary), f, indent=1))
    if not cfg.keep_work:
        work.remove()
    return summary


def _histogram(deltas: list[float], path: Path, key: str, delta_mean: float) -> str | None:
    def draw(ax):
        ax.hist(deltas, bins=min(50, max(5, len(deltas) // 4)), color="#4C72B0")
        ax.axvline(delta_mean, color="#C44E52", linestyle="--", label=f"δ̄ = {delta_mean:.4g}")
        ax.set_xlabel(key)
        ax.set_ylabel("pairs")
        ax.set_title(f"DAMO data hardness: {key} over {len(deltas)} pairs")
        ax.legend()

    return plots.save_plot(path, draw)
