"""``mmalign demo``: the whole pipeline on a fresh machine, no GPU, no downloads, a few minutes on 2 cores.

1. a synthetic preference set: coloured shapes; chosen captions right, rejected ones wrong in every
   attribute (easy pairs) or in one (hard pairs)                              (:mod:`mmalign.synthetic`)
2. DAMO's data hardness: sub-sentences, CLIP scores, α_D                     (``mmalign hardness``)
3. BDHS rejected responses from the model with 99% of image tokens hidden    (``mmalign bdhs``)
4. the reference log-probs, once                                             (``mmalign train --precompute-reference``)
5. DPO and DAMO training on DeepSpeed, the implicit reward margins of easy and hard pairs tracked over
   training (DAMO's Figure 1 question: does the model keep learning the hard pairs?)
   -> a table, ``margins.png`` and ``bdhs.tries.png`` in the work directory.

Without ``--model`` / ``--clip-model`` every model is tiny and random (the numbers show the machinery
working, not what real models learn); with real weights the same command runs the real pipeline.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from . import jobs, synthetic


@dataclasses.dataclass
class DemoResult:
    workdir: str
    hardness: object
    bdhs: object
    history: dict          # loss -> list of {step, easy, hard, loss}
    table: str
    plot: str | None

    def format(self) -> str:
        return "\n".join([f"work directory: {self.workdir}", "", "## data hardness", self.hardness.format(), "",
                          "## BDHS", self.bdhs.format(), "", "## training", self.table,
                          f"margins plot: {self.plot}" if self.plot else ""])


def _models(work: Path, model: str | None, clip_model: str | None, similarity_model: str | None):
    tok = synthetic.word_tokenizer()
    if model is None:
        model = synthetic.save_tiny_llava(work / "model", tok, hidden=64, layers=2)
    if similarity_model is None:
        similarity_model = synthetic.save_tiny_sentence_model(work / "sentence-model")
    clip_pretrained = None
    if clip_model is None:
        clip_model = synthetic.tiny_open_clip_config(work)
    else:
        clip_pretrained = "openai"
    return model, clip_model, clip_pretrained, similarity_model


def run(workdir: str = "mmalign-demo", *, pairs: int = 48, steps: int = 120, model: str | None = None,
        clip_model: str | None = None, clip_pretrained: str | None = None, similarity_model: str | None = None,
        lr: float = 3e-4, micro_batch_size: int = 8, seed: int = 0, device: str | None = None,
        progress: bool = True) -> DemoResult:
    from . import hardness
    from .bdhs import BDHSConfig
    from .bdhs import job as bdhs_job
    from .train import Trainer, TrainConfig, precompute_reference

    work = Path(workdir)
    for owned in ("runs", "images", "model", "sentence-model"):
        shutil.rmtree(work / owned, ignore_errors=True)
    for old in work.glob("pairs*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    work.mkdir(parents=True, exist_ok=True)
    rows = synthetic.make_pairs(pairs, work / "images", seed)
    jobs.write_rows(work / "pairs.jsonl", rows)
    model, clip_model, default_pretrained, similarity_model = _models(work, model, clip_model, similarity_model)
    clip_pretrained = clip_pretrained if clip_pretrained is not None else default_pretrained

    hard = hardness.run(work / "pairs.jsonl", work / "pairs.hardness.jsonl", images=str(work / "images"),
                        clip_model=clip_model, clip_pretrained=clip_pretrained, progress=progress, seed=seed,
                        device=device)
    bdhs = bdhs_job.run(work / "pairs.hardness.jsonl", work / "pairs.bdhs.jsonl", model=model,
                        images=str(work / "images"), similarity_model=similarity_model, progress=progress,
                        device=device, engine=BDHSConfig(max_new_tokens=8, tries=3, seed=seed))
    base = dict(model=model, images=str(work / "images"), micro_batch_size=micro_batch_size, lr=lr, seed=seed,
                max_steps=steps, epochs=10**6, progress=progress, reference="precomputed", beta=0.1, device=device)
    precompute_reference(TrainConfig(data=str(work / "pairs.hardness.jsonl"), **base), str(work / "pairs.ref.jsonl"))

    history = {}
    every = max(1, steps // 12)
    for loss in ("dpo", "damo"):
        trainer = Trainer(TrainConfig(data=str(work / "pairs.ref.jsonl"), output_dir=str(work / "runs" / loss),
                                      loss=loss, **base))
        groups = {d: [_example(trainer, r) for r in trainer.records
                      if r.extra.get("difficulty") == d] for d in ("easy", "hard")}
        curve = []

        def track(t, row, curve=curve, groups=groups):
            if t.step % every == 0 or t.step == t.total_steps:
                curve.append({"step": t.step, "loss": row["loss"],
                              **{d: t.reward_margins(ex).mean().item() for d, ex in groups.items()}})

        trainer.train(callback=track)
        history[loss] = curve
    (work / "history.json").write_text(json.dumps(history, indent=1))
    return DemoResult(str(work), hard, bdhs, history, _table(history), _plot(history, work / "margins.png"))


def _example(trainer, rec):
    from .train import encode_pair

    return encode_pair(rec, trainer.encoder, trainer.cfg.max_length)


def _table(history: dict) -> str:
    lines = ["| loss | steps | final loss | margin easy | margin hard | hard / easy |", "|---|---:|---:|---:|---:|---:|"]
    for loss, curve in history.items():
        if not curve:
            continue
        last = curve[-1]
        ratio = last["hard"] / last["easy"] if last["easy"] else float("nan")
        lines.append(f"| {loss} | {last['step']} | {last['loss']:.4f} | {last['easy']:.4f} | {last['hard']:.4f} | "
                     f"{ratio:.2f} |")
    return "\n".join(lines)


def _plot(history: dict, path: Path) -> str | None:
    def draw(ax):
        colours = {"dpo": "#4C72B0", "damo": "#C44E52"}
        for loss, curve in history.items():
            steps = [c["step"] for c in curve]
            ax.plot(steps, [c["easy"] for c in curve], color=colours.get(loss), label=f"{loss} easy")
            ax.plot(steps, [c["hard"] for c in curve], color=colours.get(loss), linestyle="--", label=f"{loss} hard")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward margin β·(logr_w − logr_l)")
        ax.set_title("Easy vs hard pairs under DPO and DAMO")
        ax.legend()

    return jobs.save_plot(path, draw)

