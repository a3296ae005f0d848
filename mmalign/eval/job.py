"""``mmalign eval``: the local hallucination benchmarks (docs/math.md §10) for one or several models, as resumable,
sharded jobs.

Benchmarks, read from their public files (:mod:`.formats`) with images from a local folder:

    pope    POPE question files (one per setting: random, popular, adversarial); the question is the prompt
    chair   COCO instances (+ captions) JSON: every image described (``chair_prompt``); CHAIR_s, CHAIR_i,
            Recall^coco and mean length against its annotated and captioned objects (COCO's vocabulary, or the
            file's own category names: ``chair_vocabulary="instances"``)
    amber   AMBER's query and annotation JSON (+ relation.json, safe_words.txt for its generative part)

Generation goes through :mod:`mmalign.models` and the BDHS engine's batched KV-cache decoding with nothing hidden
(mode "none": one prefill per prompt, every prompt of a batch decoded together), greedy by default (the sampling
settings are recorded with the results). Families the engine cannot batch (Mllama's cross-attention cache, LFM2's
convolution state) generate with the model's own ``generate`` one prompt at a time.

Per model and benchmark the job writes ``OUT/<model>/<benchmark>.jsonl``: one row per question (its id, image,
prompt, answer, and what was read from it: POPE's parsed yes/no; CHAIR's mentioned and hallucinated objects),
through :mod:`mmalign.jobs` (progress bar; a kill loses at most one batch; a rerun resumes; records that cannot be
read go to ``<benchmark>.failed.jsonl``). A finished file is reused by later calls (``overwrite`` redoes it). Then
``OUT/summary.json``, ``summary.md`` (a table, a row per model) and ``summary.png`` (the models side by side).
A model is a model directory, a LoRA adapter directory (merged into its base), or a ``mmalign train`` output
directory (its ``model/`` or ``adapter/``)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import devices, jobs, plots
from . import formats as F
from .metrics import (ChairVocabulary, amber_discriminative_scores, amber_generative_scores, chair_scores,
                      parse_yes_no, pope_scores_by_setting)

CHAIR_PROMPT = "Please describe this image in detail."


@dataclass(frozen=True)
class EvalItem:
    """One question (or image to describe) of a benchmark; ``index`` its place in the benchmark (the job's key)."""

    index: int
    id: object
    image: str
    prompt: str
    meta: dict
    line: int | None = None  # (what a job's failure record names; the benchmarks name questions by id)


@dataclass
class Benchmark:
    """A benchmark's questions, what is read from each answer (``annotate``) and how the rows are scored."""

    name: str
    items: list
    sources: list
    annotate: Callable[[dict], dict]
    score: Callable[[list], dict]


def pope(files: list[str], *, prompt: str = "{question}", limit: int | None = None) -> Benchmark:
    """POPE: one file per setting (its name says which, as the release names them)."""
    questions = [q for path in files for q in F.read_pope_questions(path, limit=limit)]
    items = [EvalItem(i, q.question_id, q.image, prompt.format(question=q.text),
                      {"label": q.label, "setting": q.setting or "all", "object": q.object})
             for i, q in enumerate(questions)]

    def annotate(row):
        parsed = parse_yes_no(row["answer"])
        return {"parsed": parsed, "correct": parsed == row["label"]}

    def score(rows):
        return pope_scores_by_setting([r["setting"] for r in rows], [r["label"] for r in rows],
                                      [r["answer"] for r in rows])

    return Benchmark("pope", items, list(files), annotate, score)


def chair(instances: list[str], captions: list[str] | None = None, *, prompt: str = CHAIR_PROMPT,
          vocabulary: str = "coco", limit: int | None = None) -> Benchmark:
    """CHAIR: every image of the instances files (the first ``limit``) described once."""
    if vocabulary not in ("coco", "instances"):
        raise ValueError(f"chair_vocabulary: expected 'coco' or 'instances', got {vocabulary!r}")
    vocab = ChairVocabulary.coco() if vocabulary == "coco" else F.coco_vocabulary(instances)
    truth = F.read_coco_ground_truth(instances, captions, vocabulary=vocab, limit=limit)
    names = F.read_coco_images(instances, image_ids=list(truth))
    items = [EvalItem(i, iid, names[iid], prompt, {"ground_truth": sorted(truth[iid])})
             for i, iid in enumerate(truth)]

    def annotate(row):
        mentioned = vocab.mentions(row["answer"])
        return {"mentioned": mentioned, "hallucinated": [m for m in mentioned if m not in row["ground_truth"]]}

    def score(rows):
        out = chair_scores([{"id": r["id"], "text": r["answer"], "ground_truth": r["ground_truth"]} for r in rows],
                           vocab)
        return {k: v for k, v in out.items() if k != "samples"}

    return Benchmark("chair", items, list(instances) + list(captions or []), annotate, score)


def amber(queries: str, annotations: str, relation: str | None = None, safe_words: str | None = None, *,
          limit: int | None = None) -> Benchmark:
    """AMBER: its queries; discriminative ones scored like POPE (AMBER's "no"-positive convention), generative
    ones with its annotation file (needs relation.json)."""
    anns = F.read_amber_annotations(annotations)
    by_id = {a.id: a for a in anns}
    association = F.read_amber_association(relation) if relation else None
    safe = F.read_amber_safe_words(safe_words) if safe_words else ()
    items = [EvalItem(i, q.id, q.image, q.query, {"type": by_id[q.id].type if q.id in by_id else None})
             for i, q in enumerate(F.read_amber_queries(queries, limit=limit))]
    missing = [it.id for it in items if it.meta["type"] is None]
    if missing:
        raise ValueError(f"{queries}: queries {missing[:10]} have no annotation in {annotations}")

    def annotate(row):
        return {} if row["type"] == "generative" else {"parsed": parse_yes_no(row["answer"])}

    def score(rows):
        out = {}
        answers = {r["id"]: r["answer"] for r in rows}
        if any(r["type"] != "generative" for r in rows):
            out["discriminative"] = amber_discriminative_scores(anns, {k: v for k, v in answers.items()
                                                                       if by_id[k].type != "generative"})
        generative = {k: v for k, v in answers.items() if by_id[k].type == "generative"}
        if generative:
            if association is None:
                raise ValueError("amber: generative queries need relation.json (--amber-relation)")
            scores = amber_generative_scores(anns, generative, association, safe)
            out["generative"] = {k: v for k, v in scores.items() if k != "samples"}
        return out

    return Benchmark("amber", items, [queries, annotations] + [p for p in (relation, safe_words) if p], annotate,
                     score)


# ------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class Generator:
    """Answers to encoded prompts from one model (see the module docstring)."""

    def __init__(self, model, tokenizer, decoding: Decoding):
        from ..bdhs import BDHSConfig, BDHSEngine
        from ..models import adapter_for

        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.engine = None
        if adapter_for(model).family.bdhs is None:
            cfg = BDHSConfig(mode="none", tries=1, max_response_tokens=decoding.max_new_tokens,
                             do_sample=decoding.do_sample, temperature=decoding.temperature, top_p=decoding.top_p,
                             seed=decoding.seed)
            self.engine = BDHSEngine(model, tokenizer, None, cfg)

    @torch.no_grad()
    def __call__(self, prompts: list) -> list[str]:
        if self.engine is not None:
            return [text.strip() for text in self.engine.complete(prompts, 1, unguided=True)]
        return [self._generate(p) for p in prompts]

    def _generate(self, prompt) -> str:
        d = self.decoding
        ids = prompt.prompt_ids.to(self.model.device)[None]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(d.seed)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **prompt.image_inputs,
                                      max_new_tokens=d.max_new_tokens, do_sample=d.do_sample,
                                      **({"temperature": d.temperature, "top_p": d.top_p} if d.do_sample else {}))
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def load_for_eval(path: str, device: str, dtype: torch.dtype):
    """(model, processor) of a model directory, a LoRA adapter directory (merged into its base: decoding without
    the adapters' extra matmuls), or a ``mmalign train`` output directory (its ``model/`` or ``adapter/``)."""
    from ..models import load_model

    root = Path(path)
    for sub in ("model", "adapter"):
        if not (root / "config.json").exists() and not (root / "adapter_config.json").exists() and (root / sub).is_dir():
            root = root / sub
    if (root / "adapter_config.json").exists():
        import peft

        base = peft.PeftConfig.from_pretrained(str(root)).base_model_name_or_path
        model, processor = load_model(base, device, dtype)
        return peft.PeftModel.from_pretrained(model, str(root)).merge_and_unload().eval(), processor
    if not (root / "config.json").exists():
        raise ValueError(f"model {path}: not a model directory, a LoRA adapter directory or a training run's output")
    return load_model(str(root), device, dtype)


# ---------------------------------------------------------------------------------------------- the job
@dataclass
class EvalConfig:
    models: dict = field(default_factory=dict)   # name -> model directory / adapter / run (or (model, processor))
    images: str | None = None
    pope: list = field(default_factory=list)     # POPE question files
    pope_prompt: str = "{question}"
    chair_instances: list = field(default_factory=list)
    chair_captions: list = field(default_factory=list)
    chair_prompt: str = CHAIR_PROMPT
    chair_vocabulary: str = "coco"
    amber_queries: str | None = None
    amber_annotations: str | None = None
    amber_relation: str | None = None
    amber_safe_words: str | None = None
    limit: int | None = None
    decoding: Decoding = field(default_factory=Decoding)
    prompt_template: str | None = None
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    shard: str | None = None
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one model (--model NAME=PATH)")
        for name in self.models:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"models: {name!r} is not usable as a folder name")
        if not (self.pope or self.chair_instances or self.amber_queries):
            raise ValueError("benchmarks: give POPE questions, COCO instances (CHAIR) or AMBER queries")
        if bool(self.amber_queries) != bool(self.amber_annotations):
            raise ValueError("amber: give both the queries and the annotations")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: expected >= 1, got {self.limit}")
        if self.batch_size < 1 or self.decoding.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens: expected >= 1")
        if "{question}" not in self.pope_prompt:
            raise ValueError("pope_prompt: must contain {question}")
        devices.check_device(self.device)

    def benchmarks(self) -> list[Benchmark]:
        out = []
        if self.pope:
            out.append(pope(self.pope, prompt=self.pope_prompt, limit=self.limit))
        if self.chair_instances:
            out.append(chair(self.chair_instances, self.chair_captions, prompt=self.chair_prompt,
                             vocabulary=self.chair_vocabulary, limit=self.limit))
        if self.amber_queries:
            out.append(amber(self.amber_queries, self.amber_annotations, self.amber_relation, self.amber_safe_words,
                             limit=self.limit))
        return out


def _answer(batch: list, encoder, generator: Generator) -> list[dict]:
    def encode(item):
        try:
            return encoder.encode(str(item.id), item.prompt, item.image)
        except OSError as e:  # an image that is not there or not an image
            raise ValueError(f"image {item.image}: {e}") from None

    results, items, prompts = jobs.prepare(batch, encode)
    for item, answer in zip(items, generator(prompts) if prompts else []):
        results.append({"index": item.index, "status": "ok", "id": item.id, "answer": answer})
    return sorted(results, key=lambda r: r["index"])


def _merge(bench: Benchmark, out: Path, work: jobs.WorkDir) -> None:
    rows, failures = [], []
    for item, res in jobs.join_results(bench.items, work.all_results(), work):
        if res["status"] != "ok":
            failures.append(res)
            continue
        row = {"id": item.id, "image": item.image, "prompt": item.prompt, **item.meta, "answer": res["answer"]}
        rows.append({**row, **bench.annotate(row)})
    jobs.write_rows(out, rows)
    failed = jobs.write_failed(out, failures)
    if failed:
        print(f"eval: {len(failures)} questions skipped, reasons in {failed}", file=sys.stderr)
    work.remove()


def _dtype(cfg: EvalConfig, device: str) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _evaluate_model(name: str, spec, benches: list[Benchmark], cfg: EvalConfig, out: Path) -> None:
    from ..models import PromptEncoder

    todo = [b for b in benches if cfg.overwrite or not (out / name / f"{b.name}.jsonl").exists()
            or (out / name / f"{b.name}.jsonl.work").exists()]
    if not todo:
        return
    device = devices.default_device(cfg.device)
    model, processor = spec if isinstance(spec, tuple) else load_for_eval(spec, device, _dtype(cfg, device))
    encoder = PromptEncoder(processor, template=cfg.prompt_template, images=cfg.images, device=model.device,
                            dtype=next(model.parameters()).dtype)
    generator = Generator(model, encoder.tokenizer, cfg.decoding)
    for bench in todo:
        path = out / name / f"{bench.name}.jsonl"
        params = {"model": spec if isinstance(spec, str) else type(spec[0]).__name__, "benchmark": bench.name,
                  "sources": [str(Path(s).resolve()) for s in bench.sources], "limit": cfg.limit,
                  "images": str(Path(cfg.images).resolve()) if cfg.images else None,
                  "prompt_template": cfg.prompt_template, "decoding": dataclasses.asdict(cfg.decoding),
                  "prompt": cfg.pope_prompt if bench.name == "pope" else cfg.chair_prompt}
        work = jobs.run_records(jobs.JobSpec(
            name=f"eval {name} {bench.name}", input=bench.sources[0], out=jobs.check_output(path, True),
            shard=jobs.Shard.parse(cfg.shard), params=params, read=lambda b=bench: iter(b.items),
            process=lambda batch: _answer(batch, encoder, generator), batch_size=cfg.batch_size,
            progress=cfg.progress, count=len(bench.items)))
        if work is not None:
            _merge(bench, path, work)


@dataclass
class EvalSummary:
    scores: dict          # model -> benchmark -> metrics
    out: str

    def format(self) -> str:
        return f"{table(self.scores)}\nrows, summary.json, summary.md, summary.png: {self.out}"


def run(cfg: EvalConfig, out: str | os.PathLike) -> EvalSummary | None:
    """Evaluate every model on every benchmark (resuming where a run stopped); the summary once every model's
    rows are there (None in a shard that left some to others)."""
    cfg.validate()
    out = Path(out)
    benches = cfg.benchmarks()
    for name, spec in cfg.models.items():
        _evaluate_model(name, spec, benches, cfg, out)
    if not all((out / name / f"{b.name}.jsonl").exists() for name in cfg.models for b in benches):
        return None
    scores = {name: {b.name: b.score(_rows(out / name / f"{b.name}.jsonl")) for b in benches}
              for name in cfg.models}
    jobs.atomic_write(out / "summary.json", lambda f: json.dump(scores, f, indent=1))
    jobs.atomic_write(out / "summary.md", lambda f: f.write(table(scores) + "\n"))
    plots.save_plot(out / "summary.png", lambda ax: plot(ax, scores))
    return EvalSummary(scores, str(out))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


# --------------------------------------------------------------------------------------------- reports
def headline(scores: dict) -> dict[str, float]:
    """The numbers a summary row shows, by column: POPE accuracy / F1 / yes-ratio per setting; CHAIR_s, CHAIR_i,
    recall, mean length; AMBER's discriminative accuracy / F1 and generative CHAIR, Cover, Hal, Cog."""
    out = {}
    for setting, m in (scores.get("pope") or {}).items():
        out.update({f"POPE {setting} acc": m["accuracy"], f"POPE {setting} F1": m["f1"],
                    f"POPE {setting} yes": m["yes_ratio"]})
    if "chair" in scores:
        m = scores["chair"]
        out.update({"CHAIR_s": m["chair_s"], "CHAIR_i": m["chair_i"], "Recall": m["recall"],
                    "length": m["mean_length"]})
    amber_scores = scores.get("amber") or {}
    if "discriminative" in amber_scores:
        m = amber_scores["discriminative"]["discriminative"]
        out.update({"AMBER acc": m["accuracy"], "AMBER F1": m["f1"]})
    if "generative" in amber_scores:
        m = amber_scores["generative"]
        out.update({"AMBER CHAIR": m["chair"], "AMBER Cover": m["cover"], "AMBER Hal": m["hal"],
                    "AMBER Cog": m["cog"]})
    return out


def table(scores: dict) -> str:
    """A Markdown table: a row per model, a column per headline number."""
    rows = {name: headline(s) for name, s in scores.items()}
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join("" if c not in r else
                                                  (f"{r[c]:.1f}" if c == "length" else f"{r[c]:.3f}")
                                                  for c in columns) + " |")
    return "\n".join(lines)


def plot(ax, scores: dict) -> None:
    """The headline ratios (length left out) as bars, the models side by side."""
    rows = {name: {k: v for k, v in headline(s).items() if k != "length"} for name, s in scores.items()}
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    width = 0.8 / max(1, len(rows))
    for i, (name, r) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(columns))], [r.get(c, 0.0) for c in columns], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
    ax.set_xticklabels(columns, rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
