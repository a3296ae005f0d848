"""``mmalign bdhs``: BDHS rejected responses for a whole dataset, as a resumable, sharded job (the same
work-file mechanism as ``mmalign hardness``, :mod:`mmalign.jobs`).

Each record's prompt is formatted (the processor's chat template when it has one, else
``--prompt-template``, default LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``), its image is
decoded and processed, and the engine generates ỹ-. The output is the canonical dataset with
``rejected`` replaced by ỹ- (the original kept as ``rejected_original``) and ``bdhs_try``,
``bdhs_similarity``, ``bdhs_accepted``, ``bdhs_guided``; beside it the failed records, a summary JSON
and ``OUT.tries.png``: how many pairs needed 1..N tries (the study's Figure 10).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data, devices, jobs, plots
from ..models import PromptEncoder, load_model
from .engine import BDHSConfig, BDHSEngine, SentenceSimilarity


@dataclass
class BDHSJobConfig:
    model: str | None = None             # a local Hugging Face VLM or causal LM directory
    images: str | None = None
    engine: BDHSConfig = field(default_factory=BDHSConfig)
    similarity_model: str = "sentence-transformers/all-mpnet-base-v2"
    prompt_template: str | None = None   # "{prompt}" (and "<image>" for VLMs); None: chat template or LLaVA-1.5
    batch_size: int = 8
    layout: str = "auto"
    columns: dict | None = None
    split: str | None = None
    device: str | None = None
    dtype: str = "auto"                  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    strict: bool = False
    shard: str | None = None
    overwrite: bool = False
    keep_work: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype: expected auto, float32, bfloat16, float16 or float64, got {self.dtype!r}")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template: must contain {prompt}")
        devices.check_device(self.device)


@dataclass
class BDHSSummary:
    records: int
    generated: int
    failed: int
    accepted: int
    unguided: int
    tries: dict            # try index -> number of pairs accepted at that try (Figure 10)
    mean_similarity: float
    output: str
    failed_file: str | None
    plot: str | None = None
    extra: dict = field(default_factory=dict)

    def format(self) -> str:
        table = ["| try | pairs |", "|---:|---:|"] + [f"| {k} | {v} |" for k, v in self.tries.items()]
        lines = [f"pairs: {self.records} read, {self.generated} rejected responses generated, {self.failed} failed",
                 f"accepted by the similarity gate: {self.accepted - self.unguided}; unguided last tries: "
                 f"{self.unguided}; mean similarity {self.mean_similarity:.4f}", *table, f"output: {self.output}"]
        if self.failed_file:
            lines.append(f"failed records: {self.failed_file}")
        if self.plot:
            lines.append(f"tries plot: {self.plot}")
        return "\n".join(lines)


def _device_dtype(cfg: BDHSJobConfig):
    device = devices.default_device(cfg.device)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


def _process(batch, engine: BDHSEngine, encode: PromptEncoder, cfg: BDHSJobConfig) -> list[dict]:
    def pair_input(rec):
        if not rec.chosen.strip():
            raise ValueError("chosen is empty: nothing to guide BDHS")
        return encode(rec)

    results, recs, pairs = jobs.prepare(batch, pair_input)
    jobs.stop_if_strict(results, cfg.strict)
    for rec, res in zip(recs, engine.generate(pairs) if pairs else []):
        if not res.rejected.strip():
            results.append(jobs.failure(rec.index, rec.line, rec.id, f"BDHS generated no text in {res.tries} tries "
                                        "(the model ended every response at once)"))
            continue
        results.append({"index": rec.index, "status": "ok", "id": rec.id, "rejected": res.rejected,
                        "bdhs_try": res.tries, "bdhs_similarity": res.similarity, "bdhs_accepted": res.accepted,
                        "bdhs_guided": res.guided})
    return sorted(results, key=lambda r: r["index"])


def run(input: str | os.PathLike, out: str | os.PathLike, config: BDHSJobConfig | None = None, *,
        model=None, processor=None, similarity=None, **overrides) -> BDHSSummary | None:
    """Run (or resume) BDHS over ``input`` and write ``out``. ``model``/``processor``/``similarity``
    objects replace what the config would load (``model="path"`` sets the config field). Returns the
    summary when this process merged."""
    if isinstance(model, (str, os.PathLike)):
        overrides["model"], model = str(model), None
    cfg = dataclasses.replace(config or BDHSJobConfig(), **overrides)
    cfg.validate()
    out = jobs.check_output(out, cfg.overwrite)
    device, dtype = _device_dtype(cfg)
    if model is None:
        if not cfg.model:
            raise ValueError("model: give a local Hugging Face model directory (--model)")
        model, processor = load_model(cfg.model, device, dtype)
    elif processor is None:
        raise ValueError("processor: give the model's processor (or tokenizer) with the model")
    similarity_desc = cfg.similarity_model if similarity is None else getattr(similarity, "description", "custom")
    similarity = similarity or SentenceSimilarity(cfg.similarity_model, device=device)
    engine = BDHSEngine(model, getattr(processor, "tokenizer", processor), similarity, cfg.engine)
    encode = PromptEncoder(processor, template=cfg.prompt_template, images=cfg.images, device=engine.device,
                           dtype=next(model.parameters()).dtype)
    params = {**jobs.input_params(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split, images=cfg.images),
              "model": cfg.model or type(model).__name__, "similarity": similarity_desc,
              "template": cfg.prompt_template, "engine": dataclasses.asdict(cfg.engine)}
    started = time.time()
    work = jobs.run_records(jobs.JobSpec(
        name="bdhs", input=str(input), out=out, shard=jobs.Shard.parse(cfg.shard), params=params,
        read=lambda: data.iter_records(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split),
        process=lambda batch: _process(batch, engine, encode, cfg), batch_size=cfg.batch_size,
        progress=cfg.progress, tally=_tally))
    if work is None:
        return None
    summary = merge(input, out, cfg, work)
    summary.extra["seconds_this_process"] = round(time.time() - started, 3)
    return summary


def _tally(results: list[dict]) -> dict:
    """Progress-bar counts of a batch: rejected responses generated, and how many the first try gave."""
    ok = [r for r in results if r["status"] == "ok"]
    return {"generated": len(ok), "first_try": sum(r["bdhs_try"] == 1 and r["bdhs_accepted"] for r in ok)}


def merge(input, out: Path, cfg: BDHSJobConfig, work: jobs.WorkDir) -> BDHSSummary:
    results = work.all_results()
    rows, failures, tries = [], [], {t: 0 for t in range(1, cfg.engine.tries + 1)}
    sims = []
    records = data.iter_records(input, layout=cfg.layout, columns=cfg.columns, split=cfg.split)
    for rec, res in jobs.join_results(records, results, work):
        if res["status"] != "ok":
            failures.append(res)
            continue
        row = rec.canonical()
        row["rejected_original"], row["rejected"] = row["rejected"], res["rejected"]
        row.update({k: res[k] for k in ("bdhs_try", "bdhs_similarity", "bdhs_accepted", "bdhs_guided")})
        row["bdhs_mode"] = cfg.engine.mode
        rows.append(row)
        tries[res["bdhs_try"]] += 1
        sims.append(res["bdhs_similarity"])
    jobs.write_rows(out, rows)
    summary = BDHSSummary(
        records=len(results), generated=len(rows), failed=len(failures),
        accepted=sum(r["bdhs_accepted"] for r in rows), unguided=sum(not r["bdhs_guided"] for r in rows),
        tries=tries, mean_similarity=sum(sims) / len(sims) if sims else float("nan"), output=str(out),
        failed_file=jobs.write_failed(out, failures))

    def draw(ax):
        ax.bar([str(t) for t in tries], list(tries.values()), color="#4C72B0")
        ax.set_xlabel("tries needed")
        ax.set_ylabel("pairs")
        ax.set_title(f"BDHS ({cfg.engine.mode}): tries per pair, ε_s = {cfg.engine.similarity_threshold}")

    summary.plot = plots.save_plot(out.with_name(out.stem + ".tries.png"), draw)
    jobs.atomic_write(out.with_name(out.stem + ".summary.json"),
                      lambda f: json.dump(dataclasses.asdict(summary), f, indent=1))
    if not cfg.keep_work:
        work.remove()
    return summary
