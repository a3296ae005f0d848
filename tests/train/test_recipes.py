"""The papers' recipes in ``mmalign train`` (docs/math.md §11) on tiny random models, CPU: what trains (roles and
patterns), LoRA through peft (TRL's losses step by step, the reference with the adapters off, resume, the adapter
saved, loaded and merged), parameter groups, schedules, held-out metrics, a run killed between checkpoints, QLoRA
refused without bitsandbytes, and the recipe files themselves."""
import copy
import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
peft = pytest.importorskip("peft")

from mmalign import synthetic  # noqa: E402
from mmalign.cli import main  # noqa: E402
from mmalign.models import load_model  # noqa: E402
from mmalign.train import Trainer, TrainConfig, pair_logps  # noqa: E402
from mmalign.train.optim import lr_factor  # noqa: E402
from mmalign.train.policy import choose_trainable  # noqa: E402

from ..bdhs import _models as M  # noqa: E402
from ..hardness import _fixtures as fx  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    tok = M.tokenizer()
    model_dir = M.save_llava(root / "llava", tok)
    fx.write_images(root / "images")
    rows = fx.pairs(8)
    for i, r in enumerate(rows):
        r["difficulty"] = "hard" if i % 2 else "easy"
    fx.write_jsonl(root / "in.jsonl", rows)
    return root, model_dir


def _cfg(root, model_dir, out, **kw):
    base = dict(model=model_dir, data=str(root / "in.jsonl"), images=str(root / "images"), output_dir=str(out),
                reference="model", micro_batch_size=4, max_steps=1, lr=1e-3, progress=False, device="cpu",
                tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _train_rows(path):
    return [r for r in map(json.loads, open(path)) if r["split"] == "train"]


# ----------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("options,expected", [
    (dict(scheduler="constant", warmup_steps=2), [0.5, 1.0, 1.0, 1.0, 1.0]),
    (dict(scheduler="linear"), [1.0, 0.8, 0.6, 0.4, 0.2]),
    (dict(scheduler="cosine", warmup_steps=1), [1.0, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
    (dict(scheduler="cosine", warmup_ratio=0.4), [0.5, 1.0, 1.0, 0.75, 0.25]),  # cos(pi/3) = 1/2
], ids=["constant-warmup", "linear", "cosine-warmup-steps", "cosine-warmup-ratio"])
def test_schedule_values(options, expected):
    """The factor of the learning rate at each of 5 optimizer steps (hand-computed: cos(pi/4) = 0.7071...)."""
    factor = lr_factor(TrainConfig(**options), 5)
    assert [factor(s) for s in range(5)] == pytest.approx(expected, abs=1e-12)


def test_the_trainer_follows_its_schedule_and_groups(setup, tmp_path):
    """The lr each step logs is the schedule's, per parameter group (the projector at its own rate, with its own
    weight decay in the optimizer); the grad norm is logged every step."""
    root, model_dir = setup
    trainer = Trainer(_cfg(root, model_dir, tmp_path, micro_batch_size=2, max_steps=3, scheduler="linear",
                           param_groups=[{"params": "projector", "lr": 1e-2, "weight_decay": 0.1}]))
    groups = trainer.engine.optimizer.param_groups
    projector = {id(p) for p in trainer.policy.model.multi_modal_projector.parameters()}
    assert [(g["weight_decay"], {id(p) for p in g["params"]} == projector) for g in groups] == [(0.1, True),
                                                                                                   (0.0, False)]
    rows = trainer.train()
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert [r["lr/projector"] for r in rows] == pytest.approx([1e-2, 1e-2 * 2 / 3, 1e-2 / 3])
    assert all(r["grad_norm"] > 0 for r in rows)


# ------------------------------------------------------------------------------------------ what trains
def test_roles_and_patterns_choose_what_trains(setup):
    root, model_dir = setup
    model, _ = load_model(model_dir, "cpu", torch.float32)
    counts = choose_trainable(model, ["llm", "*multi_modal_projector.linear_1.*"], ["*.layers.0.*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.multi_modal_projector.linear_1.weight" in trainable
    assert "model.multi_modal_projector.linear_2.weight" not in trainable
    assert not any(".layers.0." in n or "vision_tower" in n for n in trainable)
    assert "model.language_model.layers.1.mlp.up_proj.weight" in trainable and "lm_head.weight" in trainable
    assert counts["vision"][0] == 0 and counts["vision"][1] > 0
    with pytest.raises(ValueError, match="'nothing.\\*' is no role"):
        choose_trainable(model, ["llm", "nothing.*"])
    with pytest.raises(ValueError, match="no parameter left to train"):
        choose_trainable(model, ["vision"], ["*"])


def test_qwen_merger_is_the_projector():
    """Qwen2.5-VL keeps its projector (the patch merger) inside its visual tower: the default recipe trains the
    merger and the LLM, and freezes the rest of the tower."""
    from ..models import zoo

    model = zoo.build("qwen2_5_vl").model
    choose_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.visual.merger.") for n in trainable)
    assert not any(n.startswith("model.visual.") and not n.startswith("model.visual.merger.") for n in trainable)


# ---------------------------------------------------------------------------------------------- LoRA
def test_qlora_is_refused_without_bitsandbytes(setup, tmp_path):
    root, model_dir = setup
    with pytest.raises(ValueError, match="set lora"):
        _cfg(root, model_dir, tmp_path, quantize="4bit").validate()
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: bitsandbytes may load")
    with pytest.raises(ValueError, match="quantize='4bit'.*(bitsandbytes|CUDA GPU)"):
        Trainer(_cfg(root, model_dir, tmp_path, quantize="4bit", lora={"r": 4}))


def test_lora_reference_is_the_base_with_the_adapters_off(setup, tmp_path):
    """No copy of the model: the reference log-probs are the base model's, before and after the adapters and the
    projector (modules_to_save) have trained; the policy's are not after a step."""
    root, model_dir = setup
    base, _ = load_model(model_dir, "cpu", torch.float64)
    trainer = Trainer(_cfg(root, model_dir, tmp_path, lora={"r": 4, "alpha": 8}, max_steps=2, lr=1e-2),
                      model=copy.deepcopy(base).float(), processor=load_model(model_dir, "cpu", torch.float32)[1])
    assert trainer.reference is None and trainer.lora
    batch = trainer.micro_batch(0)
    own = [x.float() for x in pair_logps(base.float(), batch)]
    for _ in range(2):
        rc, rr = trainer._reference_logps(batch)
        torch.testing.assert_close(rc, own[0])
        torch.testing.assert_close(rr, own[1])
        trainer.train()
    with torch.no_grad():
        pc, _ = pair_logps(trainer.policy, batch)
    assert (pc - own[0]).abs().max() > 1e-4
    names = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and any("multi_modal_projector.modules_to_save" in n for n in names)
    assert not any("vision_tower" in n for n in names)


def test_lora_adapter_is_saved_loadable_and_mergeable(setup, tmp_path):
    root, model_dir = setup
    trainer = Trainer(_cfg(root, model_dir, tmp_path / "run", lora={"r": 4, "alpha": 8}, max_steps=2, lr=1e-2))
    trainer.train()
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    batch = trainer.micro_batch(0)
    with torch.no_grad():
        want = pair_logps(trainer.policy, batch)
        base, _ = load_model(model_dir, "cpu", torch.float32)
        loaded = peft.PeftModel.from_pretrained(base, str(adapter))
        for got, expected in zip(pair_logps(loaded, batch), want):
            torch.testing.assert_close(got, expected)
        assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "merged"), "--base", model_dir]) == 0
        merged, _ = load_model(str(tmp_path / "merged"), "cpu", torch.float32)
        for got, expected in zip(pair_logps(merged, batch), want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_resume_continues_exactly(setup, tmp_path):
    root, model_dir = setup
    kw = dict(lora={"r": 4, "alpha": 8}, micro_batch_size=2, lr=1e-2, epochs=3, save_every=2, scheduler="cosine",
              warmup_steps=1)
    whole = Trainer(_cfg(root, model_dir, tmp_path / "a", max_steps=4, **kw))
    whole.train()
    # stopped after the checkpoint of step 2 (the schedule is that of the 4-step run)
    Trainer(_cfg(root, model_dir, tmp_path / "b", max_steps=4, **kw)).train(callback=lambda t, row: row["step"] == 2)
    resumed = Trainer(_cfg(root, model_dir, tmp_path / "b", max_steps=4, **kw))
    assert resumed.step == 2
    resumed.train()
    for p, q in zip(whole.policy.parameters(), resumed.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in rows]  # noqa: E731
    assert drop(_train_rows(tmp_path / "a" / "metrics.jsonl")) == drop(_train_rows(tmp_path / "b" / "metrics.jsonl"))


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_under_zero(setup, tmp_path, stage):
    """ZeRO-2 and ZeRO-3 with LoRA: the loss starts at log 2 (the adapters start at zero) and moves."""
    root, model_dir = setup
    rows = Trainer(_cfg(root, model_dir, tmp_path, lora={"r": 4, "alpha": 8}, zero_stage=stage, max_steps=2,
                        lr=1e-2)).train()
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[1]["loss"] < rows[0]["loss"]


def test_lora_gives_trls_losses_step_by_step(tmp_path):
    """The same LoRA policy (peft config and initialization), data, optimizer (AdamW, lr 1e-2, linear decay, clipping
    at 1.0) and batch (all 8 pairs each step): mmalign's trainer gives TRL DPOTrainer's losses step by step."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = synthetic.word_tokenizer(image_token=None)
    rows = synthetic.make_pairs(8, tmp_path / "images")
    prompt = "USER : Describe the image . ASSISTANT :"
    fx.write_jsonl(tmp_path / "pairs.jsonl", [{**r, "prompt": prompt} for r in rows])
    ds = datasets.Dataset.from_list([{"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    def policy():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        torch.manual_seed(1)
        return peft.get_peft_model(model, lora)

    ours = Trainer(TrainConfig(data=str(tmp_path / "pairs.jsonl"), prompt_template="{prompt}", output_dir=str(tmp_path / "ours"),
                               reference="model", micro_batch_size=8, max_steps=3, epochs=3, lr=1e-2, scheduler="linear",
                               device="cpu", progress=False, tensorboard=False, save_final=False),
                   model=policy(), processor=tok)
    a = [r["loss"] for r in ours.train()]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=3,
                         learning_rate=1e-2, lr_scheduler_type="linear", beta=0.1, max_length=64, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=False)
    theirs = trl.DPOTrainer(model=policy(), ref_model=None, args=args, train_dataset=ds, processing_class=tok)
    theirs.train()
    b = [h["loss"] for h in theirs.state.log_history if "loss" in h]
    assert len(a) == 3 and a[0] == pytest.approx(math.log(2), abs=1e-6) and abs(a[2] - a[0]) > 1e-3
    assert a == pytest.approx(b, rel=1e-4), (a, b)


# ------------------------------------------------------------------------------------- held-out metrics
def test_held_out_metrics_on_a_constructed_set(setup, tmp_path):
    """Held-out pairs whose reference log-probs are set so that the policy's log-ratios are known: a_i for chosen,
    b_i for rejected. Then every reward, margin, accuracy and loss is known (beta 0.5), overall and per group."""
    root, model_dir = setup
    probe = Trainer(_cfg(root, model_dir, tmp_path / "probe", reference="model"))
    records = [json.loads(x) for x in open(root / "in.jsonl")]
    with torch.no_grad():
        pc, pr = pair_logps(probe.policy, [probe.encode(r) for r in probe.records])
    a = [2.0, -1.0, 0.5, 3.0, 1.0, 0.0, -2.0, 4.0]  # chosen log-ratios
    b = [1.0, 1.0, 0.5, -1.0, 3.0, -2.0, -2.5, 0.0]  # rejected log-ratios
    by_id = {r.id: i for i, r in enumerate(probe.records)}
    held = []
    for r in records:
        i = by_id[r["id"]]
        held.append({**r, "ref_chosen_logp": float(pc[i]) - a[i], "ref_rejected_logp": float(pr[i]) - b[i]})
    fx.write_jsonl(tmp_path / "held.jsonl", held)
    trainer = Trainer(_cfg(root, model_dir, tmp_path / "run", reference="precomputed", beta=0.5,
                           data=str(tmp_path / "held.jsonl"), eval_data=str(tmp_path / "held.jsonl"),
                           group_column="difficulty", eval_batch_size=3))
    row = trainer.evaluate()
    order = [by_id[r["id"]] for r in records]  # the file's order: easy, hard, easy, ...
    expected = {}
    for name, idx in (("", order), ("easy/", order[0::2]), ("hard/", order[1::2])):
        margins = [0.5 * (a[i] - b[i]) for i in idx]
        expected.update({f"{name}chosen_reward": sum(0.5 * a[i] for i in idx) / len(idx),
                         f"{name}rejected_reward": sum(0.5 * b[i] for i in idx) / len(idx),
                         f"{name}margin": sum(margins) / len(idx),
                         f"{name}accuracy": sum(m > 0 for m in margins) / len(idx),
                         f"{name}loss": sum(math.log1p(math.exp(-m)) for m in margins) / len(idx)})
    assert row["pairs"] == 8 and row["split"] == "eval"
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_held_out_split_is_scored_during_training(setup, tmp_path):
    root, model_dir = setup
    trainer = Trainer(_cfg(root, model_dir, tmp_path, micro_batch_size=2, max_steps=4, epochs=2, eval_fraction=0.25,
                           eval_every=2, group_column="difficulty"))
    assert len(trainer.records) == 6 and trainer.held_out is not None
    trainer.train()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval"), (3, "train"),
                                                        (4, "train"), (4, "eval")]
    assert rows[2]["pairs"] == 2 and any(k in rows[2] for k in ("easy/margin", "hard/margin"))


# ----------------------------------------------------------------------------------- kill and resume
def _cli(root, model_dir, out):
    return [sys.executable, "-m", "mmalign", "train", "--model", model_dir, "--data", str(root / "in.jsonl"),
            "--images", str(root / "images"), "--output-dir", str(out), "--reference", "model", "--micro-batch-size",
            "2", "--epochs", "3", "--max-steps", "8", "--save-every", "3", "--lr", "1e-3", "--device", "cpu",
            "--no-progress"]


def test_a_run_killed_between_checkpoints_logs_no_step_twice(setup, tmp_path):
    """SIGKILL right after step 4 (checkpoint at 3): the rerun of the same command resumes at 3, redoes 4, and the
    metrics log ends with the uninterrupted run's rows, each step once. The killed run is the same configuration
    driven from Python, whose step callback reports step 4 and waits to be killed (no timing involved)."""
    root, model_dir = setup
    killed = tmp_path / "killed"
    argv = _cli(root, model_dir, killed)[3:]
    driver = ("import sys\n"
              "from mmalign.cli import build_parser\n"
              "from mmalign.train import Trainer, TrainConfig\n"
              "args = build_parser().parse_args(sys.argv[1:])\n"
              "keys = ('model', 'data', 'images', 'output_dir', 'reference', 'micro_batch_size', 'epochs', "
              "'max_steps', 'save_every', 'lr', 'device')\n"
              "cfg = TrainConfig(**{k: getattr(args, k) for k in keys}, progress=False)\n"
              "def wait(trainer, row):\n"
              "    if row['step'] == 4:\n"
              "        print('step 4', flush=True)\n"
              "        sys.stdin.read()\n"
              "Trainer(cfg).train(callback=wait)\n")
    # a fresh process, not one launched under this one's process group (earlier tests set RANK, MASTER_PORT, ...)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                                                             "CROSS_SIZE")}
    proc = subprocess.Popen([sys.executable, "-c", driver, *argv], env={**env, "PYTHONPATH": str(ROOT)},
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in iter(proc.stdout.readline, ""):  # DeepSpeed writes to stdout too
        seen.append(line)
        if line.strip() == "step 4":
            break
    assert seen and seen[-1].strip() == "step 4", "".join(seen[-20:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r["step"] for r in _train_rows(killed / "metrics.jsonl")] == [1, 2, 3, 4]  # step 4 past the checkpoint
    assert main(argv) == 0  # the same command again: resumes at 3
    assert main(_cli(root, model_dir, tmp_path / "whole")[3:]) == 0
    drop = lambda rows: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in rows]  # noqa: E731
    a, b = _train_rows(killed / "metrics.jsonl"), _train_rows(tmp_path / "whole" / "metrics.jsonl")
    assert [r["step"] for r in a] == list(range(1, 9))
    assert drop(a) == drop(b)
    # TensorBoard: the killed run's events hold steps 1-4; the resumed run's file starts with a restart marker at
    # step 4 (purge_step: readers drop the killed run's events from step 4 on) and holds steps 4-8. Each file is
    # read on its own: TensorBoard orders files by name, which within one second is by process id.
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    files = sorted((killed / "tensorboard").glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime)
    runs = [[e for e in loader.EventFileLoader(str(f)).Load()] for f in files]
    steps = [[e.step for e in run if e.HasField("summary") and e.summary.value[0].tag == "train/loss"] for run in runs]
    assert steps == [[1, 2, 3, 4], [4, 5, 6, 7, 8]]
    starts = [e.step for e in runs[1] if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]


# ------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_recipes_run_on_a_tiny_model(setup, tmp_path, recipe):
    """Each recipe file as it is (its DeepSpeed section, precision, schedule, what trains, LoRA), on the tiny LLaVA
    through overrides: model, data, two steps of two pairs, a live reference, the CPU."""
    root, model_dir = setup
    cfg = TrainConfig.from_file(str(ROOT / "recipes" / recipe))
    cfg.validate()
    argv = ["train", "--config", str(ROOT / "recipes" / recipe), "--model", model_dir, "--data", str(root / "in.jsonl"),
            "--images", str(root / "images"), "--output-dir", str(tmp_path), "--max-steps", "2",
            "--micro-batch-size", "2", "--reference", "model", "--device", "cpu", "--no-progress",
            "--set", "layout=canonical", "--set", "save_every=null"]
    assert main(argv) == 0
    rows = _train_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)
    if cfg.lora:
        assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_sft_is_the_token_mean_nll_of_the_chosen_responses(setup, tmp_path):
    """loss="sft" (the demo's warm-up): the first step's loss is the chosen responses' negative log-likelihood per
    token from the model's own forward (the rejected ones unused, no reference), and training lowers it."""
    root, model_dir = setup
    base, processor = load_model(model_dir, "cpu", torch.float32)
    trainer = Trainer(_cfg(root, model_dir, tmp_path, loss="sft", micro_batch_size=4, max_steps=3, epochs=3,
                           reference="precomputed"), model=copy.deepcopy(base), processor=processor)
    assert trainer.reference is None
    batch = trainer.micro_batch(0)
    nll, tokens = 0.0, 0
    for ex in batch:
        ids = torch.cat([ex.prompt_ids, torch.tensor(ex.chosen_ids)])[None]
        logits = base(input_ids=ids, **ex.image_inputs).logits[0, len(ex.prompt_ids) - 1:-1]
        nll -= float(torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(ex.chosen_ids)[:, None]).sum())
        tokens += len(ex.chosen_ids)
    rows = trainer.train()
    assert rows[0]["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert rows[2]["loss"] < rows[0]["loss"]
    with pytest.raises(ValueError, match="eval_fraction: not with loss='sft'"):
        _cfg(root, model_dir, tmp_path, loss="sft", eval_fraction=0.5).validate()


def test_every_parameter_of_every_family_has_a_role():
    """No parameter of a zoo VLM is left out of the roles (LLaVA-NeXT's image_newline, a parameter of the inner
    model itself, is the projector's): the default recipe trains exactly the LLM and the projector."""
    from mmalign.models import adapter_for
    from mmalign.train.policy import role_of

    from ..models import zoo

    for name in zoo.VARIANTS:
        model = zoo.build(name).model
        roles = adapter_for(model).roles()
        missing = [n for n, _ in model.named_parameters() if role_of(n, roles) is None]
        assert not missing, (name, missing[:5])
