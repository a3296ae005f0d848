"""The ``mmalign`` command (also ``python -m mmalign``)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _env(args) -> int:
    from ._env import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


def _ops_demo(args) -> int:
    from . import ops_demo

    print(ops_demo.run(device=args.device, seed=args.seed))
    return 0


def _demo(args) -> int:
    from . import demo

    def start():
        return demo.run(args.workdir, pairs=args.pairs, steps=args.steps, sft_steps=args.sft_steps,
                        eval_images=args.eval_images, model=args.model, clip_model=args.clip_model,
                        clip_pretrained=args.clip_pretrained, similarity_model=args.similarity_model, lr=args.lr,
                        sft_lr=args.sft_lr, seed=args.seed, device=args.device, progress=not args.no_progress)

    return _run("demo", start)


def _columns(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise SystemExit(f"--columns: expected name=column[,name=column...], got {text!r}") from None


def _job_io(args) -> dict:
    """The config fields every dataset job takes from the flags of :func:`_add_job_io`."""
    return dict(images=args.images, layout=args.layout, columns=_columns(args.columns), split=args.split,
                device=args.device, strict=args.strict, shard=args.shard, overwrite=args.overwrite,
                keep_work=args.keep_work, progress=not args.no_progress)


def _run(name: str, start) -> int:
    """Run a command: its known failures (bad input, a missing file, a job that cannot resume, a missing
    package) print one line naming the command and exit 2. What ``start`` returns is printed: a summary
    (``.format()``), a string, or nothing (None, e.g. a shard that left the merge to another process)."""
    from .data import RecordError
    from .jobs import JobError

    try:
        result = start()
    except (JobError, RecordError, ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"mmalign {name}: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(result.format() if hasattr(result, "format") and not isinstance(result, str) else result)
    return 0


def _hardness(args) -> int:
    from . import hardness

    def start():
        cfg = hardness.HardnessConfig(
            clip_model=args.clip_model,
            clip_pretrained=None if args.clip_pretrained.lower() in ("none", "random") else args.clip_pretrained,
            splitter=args.splitter, llm_model=args.llm_model, llm_batch_size=args.llm_batch_size,
            llm_max_new_tokens=args.llm_max_new_tokens, batch_size=args.batch_size,
            text_batch_size=args.text_batch_size, delta=args.delta, delta_mean=args.delta_mean, amp=not args.no_amp,
            seed=args.seed, **_job_io(args))
        return hardness.run(args.input, args.out, cfg)

    return _run("hardness", start)


def _add_hardness(sub) -> None:
    from .hardness.clip import DEFAULT_MODEL, DEFAULT_PRETRAINED

    h = sub.add_parser("hardness", help="DAMO data hardness: sub-sentences, CLIP scores, delta and alpha_d per pair",
                       description="Resumable: rerun the same command after a kill. Sharded: run under torchrun, "
                                   "or start --shard 0/N ... N-1/N; the last shard to finish writes OUT.")
    _add_job_io(h)
    h.add_argument("--clip-model", default=DEFAULT_MODEL,
                   help=f"open_clip model name, model config .json, Hugging Face CLIP directory or hf:NAME "
                        f"(default {DEFAULT_MODEL}, LLaVA-1.5's vision tower)")
    h.add_argument("--clip-pretrained", default=DEFAULT_PRETRAINED,
                   help="open_clip weights: a tag, a local checkpoint, or 'none' for random weights (tests)")
    h.add_argument("--splitter", choices=("rules", "llm"), default="rules")
    h.add_argument("--llm-model", help="local causal LM directory for --splitter llm")
    h.add_argument("--llm-batch-size", type=int, default=8)
    h.add_argument("--llm-max-new-tokens", type=int, default=256)
    h.add_argument("--batch-size", type=int, default=32, help="pairs per batch and per durable write")
    h.add_argument("--text-batch-size", type=int, default=256)
    h.add_argument("--delta", choices=("probs", "scores"), default="probs",
                   help="probs: Eq. 5-6 (default); scores: Table 2's CLIP-score ablation")
    h.add_argument("--delta-mean", type=float, help="fixed delta-bar (default: the dataset mean; the released "
                                                     "DAMO code uses 0.0482190464911681 for RLAIF-V)")
    h.add_argument("--no-amp", action="store_true", help="run CLIP in float32 on CUDA")
    h.add_argument("--seed", type=int, default=0, help="random CLIP initialisation (--clip-pretrained none)")
    h.set_defaults(fn=_hardness)


def _bdhs(args) -> int:
    from .bdhs import BDHSConfig, job

    def start():
        engine = BDHSConfig(mode=args.mode, rho_th=args.rho_th, noise_steps=args.noise_steps, tries=args.tries,
                            similarity_threshold=args.similarity_threshold, max_new_tokens=args.max_new_tokens,
                            max_response_tokens=args.max_response_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        cfg = job.BDHSJobConfig(model=args.model, engine=engine, similarity_model=args.similarity_model,
                                prompt_template=args.prompt_template, batch_size=args.batch_size, dtype=args.dtype,
                                **_job_io(args))
        return job.run(args.input, args.out, cfg)

    return _run("bdhs", start)


DEVICE_HELP = "cpu, cuda (this process's GPU, cuda:LOCAL_RANK) or cuda:N"


def _add_job_io(p, layouts=("auto", "canonical", "rlaif-v", "povid", "vlfeedback")) -> None:
    """The input/output/sharding flags every dataset job shares."""
    p.add_argument("input", help=".jsonl, .json, .parquet, a parquet directory or a saved Hugging Face dataset")
    p.add_argument("--out", required=True, help="output .jsonl or .parquet (written atomically at the end)")
    p.add_argument("--images", help="root directory of relative image paths")
    p.add_argument("--layout", default="auto", choices=layouts)
    p.add_argument("--columns", help="map canonical names to columns: prompt=question,chosen=answer_good,...")
    p.add_argument("--split", help="split of a saved DatasetDict (default train)")
    p.add_argument("--device", help=DEVICE_HELP + " (default: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--shard", help="I/N: this process does records i with i %% N == I (default: torchrun's rank)")
    p.add_argument("--overwrite", action="store_true", help="redo a finished job")
    p.add_argument("--keep-work", action="store_true", help="keep OUT.work/ after the merge")
    p.add_argument("--no-progress", action="store_true")


def _add_bdhs(sub) -> None:
    from .bdhs.engine import MODES

    b = sub.add_parser("bdhs", help="BDHS: rejected responses generated by the model with image tokens hidden",
                       description="Resumable and sharded like `mmalign hardness`.")
    _add_job_io(b)
    b.add_argument("--model", required=True, help="local Hugging Face VLM (LLaVA-1.5/1.6, ...) or causal LM directory")
    b.add_argument("--mode", choices=MODES, default="attn", help="attn (mask, default), noise, both, none, povid")
    b.add_argument("--rho-th", type=float, default=0.99, help="image tokens stay visible iff rho >= rho_th (Eq. 6)")
    b.add_argument("--noise-steps", type=int, default=500)
    b.add_argument("--tries", type=int, default=5, help="N_BDHS; with > 1 the last try is unguided")
    b.add_argument("--similarity-threshold", type=float, default=0.97, help="accept when cosine < this (eps_s)")
    b.add_argument("--similarity-model", default="sentence-transformers/all-mpnet-base-v2",
                   help="sentence-transformers model name or local path")
    b.add_argument("--prompt-template", help="with {prompt} (and <image>); default: the chat template, else LLaVA-1.5's")
    b.add_argument("--batch-size", type=int, default=8, help="pairs per batch (all their sentences decode together)")
    b.add_argument("--max-new-tokens", type=int, default=64, help="per guided sentence")
    b.add_argument("--max-response-tokens", type=int, default=256, help="the unguided last try")
    b.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--top-p", type=float, default=1.0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))
    b.set_defaults(fn=_bdhs)


def _settings(items: list[str] | None) -> dict:
    """``--set key=value`` (value read as YAML: numbers, lists, mappings); ``key.sub=value`` sets one entry of a
    mapping field (``lora.r=8``)."""
    import yaml

    out: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        value = yaml.safe_load(text)
        if "." in key:
            field, sub = key.split(".", 1)
            out.setdefault(field, {})[sub] = value
        else:
            out[key] = value
    return out


def _train(args) -> int:
    from .train import Trainer, TrainConfig, precompute_reference

    flags = {k: getattr(args, k) for k in ("model", "data", "images", "output_dir", "deepspeed", "zero_stage", "loss",
                                           "beta", "lr", "epochs", "max_steps", "micro_batch_size", "grad_accum",
                                           "max_length", "reference", "seed", "save_every", "prompt_template",
                                           "averaged_gamma", "mixed_p", "similarity_model", "device", "scheduler",
                                           "warmup_steps", "warmup_ratio", "max_grad_norm", "eval_data",
                                           "eval_fraction", "eval_every", "group_column")}
    for name in ("train", "freeze"):
        value = getattr(args, name)
        if value:
            flags[name] = value if value in ("default", "all") else value.split(",")
    if args.online_bdhs:
        flags["online_bdhs"] = {"mode": args.online_bdhs}
    flags.update({k: True for k in ("bf16", "autocast", "gradient_checkpointing", "offload_optimizer") if getattr(args, k)})
    if args.no_progress:
        flags["progress"] = False
    if args.no_prefetch:
        flags["prefetch"] = False

    def start():
        cfg = TrainConfig.from_file(args.config, **flags) if args.config else \
            TrainConfig(**{k: v for k, v in flags.items() if v is not None})
        cfg = _apply_settings(cfg, _settings(args.set))
        if args.precompute_reference:
            n = precompute_reference(cfg, args.precompute_reference, batch_size=args.batch_size or 8,
                                     shard=args.shard, overwrite=args.overwrite)
            return None if n is None else f"reference log-probs of {n} pairs written to {args.precompute_reference}"
        for flag in ("shard", "overwrite", "batch_size"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')}: only with --precompute-reference")
        rows = Trainer(cfg).train()
        return json.dumps(rows[-1]) if rows else None

    return _run("train", start)


def _apply_settings(cfg, settings: dict):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"--set: unknown options {unknown}")
    for key, value in settings.items():
        current = getattr(cfg, key)
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        setattr(cfg, key, value)
    return cfg


def _add_train(sub) -> None:
    from .train import LOSSES

    t = sub.add_parser("train", help="DPO-family training on DeepSpeed (dpo, ipo, hinge, d2po, mdpo, damo)",
                       description="Flags override the --config file (JSON or YAML with TrainConfig's fields). "
                                   "Multi-GPU / multi-node: launch with `deepspeed` or `torchrun`, unchanged.")
    t.add_argument("--config", help="JSON or YAML file with the fields of mmalign.train.TrainConfig (recipes/: the "
                                    "papers' recipes)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any TrainConfig option (value read as YAML; key.sub=value for one entry of a mapping such as "
                        "lora.r=8); repeatable, applied last")
    t.add_argument("--train", help="what trains: default (the LLM and the projector, the vision tower frozen), all, "
                                   "or comma-separated roles (llm, projector, vision) and parameter-name patterns")
    t.add_argument("--freeze", help="comma-separated parameter-name patterns kept frozen")
    t.add_argument("--scheduler", choices=("cosine", "linear", "constant"), help="after the warm-up (default constant)")
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--warmup-ratio", type=float, help="warm-up as a share of the optimizer steps")
    t.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (0: off; default 1.0)")
    t.add_argument("--eval-data", help="held-out pairs, scored every --eval-every steps and at the end")
    t.add_argument("--eval-fraction", type=float, help="hold out this share of --data instead")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--group-column", help="a column of the data: held-out metrics also per value (e.g. difficulty)")
    t.add_argument("--model", help="local Hugging Face VLM or causal LM directory")
    t.add_argument("--data", help="preference data (.jsonl, parquet, saved dataset; any layout `hardness` reads)")
    t.add_argument("--images")
    t.add_argument("--output-dir")
    t.add_argument("--deepspeed", help="a DeepSpeed JSON config, used as is ('auto' values filled)")
    t.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    t.add_argument("--device", help=DEVICE_HELP + " (default: the GPU when there is one)")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--autocast", action="store_true",
                   help="with --bf16: fp32 weights and the forward under torch.autocast (DeepSpeed's torch_autocast, the "
                        "precision of Hugging Face's Trainer) instead of DeepSpeed's bf16 mode (bf16 weights, fp32 master)")
    t.add_argument("--offload-optimizer", action="store_true")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="each decoder layer keeps only its input and reruns its forward in the backward (measured on a "
                        "CPU at a 1B decoder's widths: 95%% less activation memory per layer for 30%% more time per "
                        "layer; README: 'Measured: one training step')")
    t.add_argument("--loss", choices=sorted(LOSSES))
    t.add_argument("--beta", type=float)
    t.add_argument("--lr", type=float)
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--micro-batch-size", type=int, help="pairs per rank per micro-batch")
    t.add_argument("--grad-accum", type=int)
    t.add_argument("--max-length", type=int)
    t.add_argument("--reference", choices=("precomputed", "model"))
    t.add_argument("--prompt-template")
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int)
    t.add_argument("--online-bdhs", choices=("attn", "noise", "both", "none", "povid"),
                   help="the averaged loss (Eq. 5) with rejected responses generated online by BDHS in this mode")
    t.add_argument("--averaged-gamma", type=float, help="gamma of Eq. 5 (default 0.5)")
    t.add_argument("--mixed-p", type=float, help="Mixed-DPO (Eq. 4): probability of keeping the offline pair")
    t.add_argument("--similarity-model", help="sentence-transformers model: BDHS gate, Mixed-DPO's default ranker")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-prefetch", action="store_true",
                   help="encode each micro-batch when it is due (default on a GPU: the next one in a background "
                        "thread while the current one trains)")
    t.add_argument("--precompute-reference", metavar="OUT",
                   help="instead of training: write the data with reference log-probs to OUT (.jsonl or .parquet), "
                        "as a resumable job (rerun the same command after a kill; under torchrun the ranks share "
                        "the pairs)")
    t.add_argument("--batch-size", type=int, help="with --precompute-reference: pairs per forward (default 8)")
    t.add_argument("--shard", metavar="I/N", help="with --precompute-reference: this process's share of the pairs "
                                                  "(default: torchrun's RANK/WORLD_SIZE)")
    t.add_argument("--overwrite", action="store_true", help="with --precompute-reference: redo a finished OUT")
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    t.set_defaults(fn=_train)


def _eval(args) -> int:
    from .eval.job import Decoding, EvalConfig, run

    def start():
        models = {}
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep:
                name, path = Path(item).name, item
            if name in models:
                raise ValueError(f"--model: the name {name!r} is given twice")
            models[name] = path
        cfg = EvalConfig(models=models, images=args.images, pope=args.pope or [], pope_prompt=args.pope_prompt,
                         chair_instances=args.chair_instances or [], chair_captions=args.chair_captions or [],
                         chair_prompt=args.chair_prompt, chair_vocabulary=args.chair_vocabulary,
                         amber_queries=args.amber_queries, amber_annotations=args.amber_annotations,
                         amber_relation=args.amber_relation, amber_safe_words=args.amber_safe_words, limit=args.limit,
                         decoding=Decoding(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.seed),
                         prompt_template=args.prompt_template, batch_size=args.batch_size, device=args.device,
                         dtype=args.dtype, shard=args.shard, overwrite=args.overwrite, progress=not args.no_progress)
        return run(cfg, args.out)

    return _run("eval", start)


def _add_eval(sub) -> None:
    from .eval.job import CHAIR_PROMPT

    e = sub.add_parser("eval", help="hallucination benchmarks (POPE, CHAIR, AMBER) for one or several models",
                       description="Resumable and sharded like `mmalign hardness`: rerun the same command after a kill. "
                                   "Writes per-question rows per model and benchmark, summary.json, summary.md and "
                                   "summary.png to --out.")
    e.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model directory, a LoRA adapter directory or a `mmalign train` output directory; repeat "
                        "for several models (NAME names its rows and its line in the table)")
    e.add_argument("--out", required=True, help="the output folder")
    e.add_argument("--images", help="root folder of the benchmarks' images (COCO val2014, AMBER's images)")
    e.add_argument("--pope", action="append", metavar="FILE",
                   help="POPE question file (JSON lines: question_id, image, text, label); repeat per setting")
    e.add_argument("--pope-prompt", default="{question}", help="the prompt of a POPE question (default: the question)")
    e.add_argument("--chair-instances", action="append", metavar="FILE", help="COCO instances JSON (CHAIR's images "
                                                                             "and annotated objects)")
    e.add_argument("--chair-captions", action="append", metavar="FILE", help="COCO captions JSON (objects the "
                                                                            "reference captions mention count too)")
    e.add_argument("--chair-prompt", default=CHAIR_PROMPT)
    e.add_argument("--chair-vocabulary", choices=("coco", "instances"), default="coco",
                   help="coco: COCO's 80 categories with CHAIR's synonyms; instances: the file's own category names")
    e.add_argument("--amber-queries", help="AMBER query JSON (query_all.json, query_generative.json, ...)")
    e.add_argument("--amber-annotations", help="AMBER annotations.json")
    e.add_argument("--amber-relation", help="AMBER relation.json (needed for its generative part)")
    e.add_argument("--amber-safe-words", help="AMBER safe_words.txt")
    e.add_argument("--limit", type=int, help="the first N questions / images of each benchmark")
    e.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--prompt-template", help="with {prompt} (and <image>); default: the chat template")
    e.add_argument("--device", help=DEVICE_HELP + " (default: cuda:LOCAL_RANK when available, else cpu)")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))
    e.add_argument("--shard", help="I/N: this process's share of the questions (default: torchrun's rank)")
    e.add_argument("--overwrite", action="store_true", help="redo finished results")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=_eval)


def _merge_lora(args) -> int:
    from .train.policy import merge_adapter

    return _run("merge-lora", lambda: f"merged model written to {merge_adapter(args.adapter, args.out, args.base)}")


def _plot(args) -> int:
    from .train.plot import DEFAULT_KEYS, plot_runs

    return _run("plot", lambda: plot_runs(args.runs, args.out, args.keys.split(",") if args.keys else DEFAULT_KEYS))


def _bench(args) -> int:
    from . import bench

    def start():
        out = bench.run(args.ops.split(",") if args.ops else None, quick=args.quick, out=args.out,
                        device=args.bench_device)
        return f"{(out / 'report.md').read_text()}\nreport folder: {out}"

    return _run("bench", start)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmalign", description="Fused kernels for aligning multimodal LLMs (DAMO, BDHS).")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="versions, devices, and which backends run each op here (and why not)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(fn=_env)
    o = sub.add_parser("ops-demo", help="the fused ops against eager PyTorch on this machine")
    o.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    o.add_argument("--seed", type=int, default=0)
    o.set_defaults(fn=_ops_demo)
    d = sub.add_parser("demo", help="the whole pipeline end to end on synthetic data: warm-up, hardness, BDHS, DPO vs "
                                    "DAMO, hallucination on held-out images",
                       description="No GPU, no downloads: tiny random models unless --model/--clip-model give real ones.")
    d.add_argument("--workdir", default="mmalign-demo", help="where data, models, runs and plots go")
    d.add_argument("--pairs", type=int, default=48)
    d.add_argument("--steps", type=int, default=60, help="optimizer steps of DPO and of DAMO")
    d.add_argument("--sft-steps", type=int, default=1000, help="optimizer steps of the supervised warm-up")
    d.add_argument("--eval-images", type=int, default=16, help="held-out images of the hallucination benchmark")
    d.add_argument("--lr", type=float, default=1e-4, help="DPO / DAMO learning rate (cosine, 10%% warm-up)")
    d.add_argument("--sft-lr", type=float, default=1e-3)
    d.add_argument("--model", help="a local LLaVA-style model directory (default: a tiny random one)")
    d.add_argument("--clip-model", help="CLIP for hardness (default: a tiny random open_clip)")
    d.add_argument("--clip-pretrained")
    d.add_argument("--similarity-model", help="sentence-transformers model for BDHS (default: a tiny random one)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", help="cpu, cuda or cuda:N for every stage (default: the GPU when there is one)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=_demo)
    _add_hardness(sub)
    _add_bdhs(sub)
    _add_train(sub)
    _add_eval(sub)
    from .bench import SUITES

    bn = sub.add_parser("bench", help="benchmark suites vs eager PyTorch -> a report folder (Markdown, JSON, PNG)")
    bn.add_argument("--ops", help=f"comma-separated, among {','.join(SUITES)} (default: all)")
    bn.add_argument("--quick", action="store_true", help="smallest shapes and fewest rounds (about a minute on a CPU)")
    bn.add_argument("--out", default="bench-report")
    bn.add_argument("--bench-device", help="cpu or cuda (default: cuda when available)")
    bn.set_defaults(fn=_bench)
    m = sub.add_parser("merge-lora", help="merge a run's LoRA adapters into its base model: a plain model directory")
    m.add_argument("adapter", help="the adapter directory (OUTPUT/adapter of a LoRA run)")
    m.add_argument("--out", required=True, help="where the merged model and its processor go")
    m.add_argument("--base", help="the base model directory (default: the one adapter_config.json names)")
    m.set_defaults(fn=_merge_lora)
    pl = sub.add_parser("plot", help="curves of training runs (their metrics.jsonl) in one PNG")
    pl.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    pl.add_argument("--out", default="metrics.png")
    pl.add_argument("--keys", help="comma-separated metrics (default: loss, margin, accuracy, alpha_m, beta_mean, kept)")
    pl.set_defaults(fn=_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
