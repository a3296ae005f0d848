"""The DeepSpeed trainer on CPU (gloo) with a tiny random LLaVA: log-probs against an eager transcription
(vision once per pair), one optimizer step against plain PyTorch (ZeRO-0 and ZeRO-2), resume equal to an
uninterrupted run, two processes equal to one, the reference pass and the CLI."""
import copy
import json
import os
import socket

import pytest
import torch

pytest.importorskip("deepspeed")

from mmalign.cli import main  # noqa: E402
from mmalign.models import PromptEncoder, load_model  # noqa: E402
from mmalign.train import Trainer, TrainConfig, enable_checkpointing, encode_pair, pair_logps  # noqa: E402
from mmalign.train.runtime import init_distributed, train_device  # noqa: E402
from mmalign import data, devices, jobs  # noqa: E402

from ..bdhs import _models as M  # noqa: E402
from ..hardness import _fixtures as fx  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = M.tokenizer()
    model_dir = M.save_llava(root / "llava", tok)
    fx.write_images(root / "images")
    fx.write_jsonl(root / "in.jsonl", fx.pairs(8))
    # the gloo process group (world 1) the trainer creates stays for the session: DeepSpeed caches its groups
    # (destroying it breaks later initialize calls), and a world of 1 changes no other test's path
    yield root, model_dir


def _cfg(root, model_dir, out, **kw):
    base = dict(model=model_dir, data=str(root / "in.jsonl"), images=str(root / "images"), output_dir=str(out),
                reference="model", micro_batch_size=4, grad_accum=1, max_steps=1, lr=1e-3, progress=False,
                device="cpu")  # the tests compare with plain PyTorch on the CPU, also where there is a GPU
    base.update(kw)
    return TrainConfig(**base)


def _eager_logps(model, examples):
    """The usual way: the whole VLM forward per sequence (vision twice per pair), full logits, log_softmax."""
    out = []
    for ex in examples:
        for resp in (ex.chosen_ids, ex.rejected_ids):
            ids = torch.cat([ex.prompt_ids, torch.tensor(resp)])[None]
            logits = model(input_ids=ids, **ex.image_inputs).logits[0, :-1]
            lp = torch.log_softmax(logits.double(), -1)
            target = ids[0, 1:]
            P = len(ex.prompt_ids)
            out.append(lp[P - 1:, :].gather(1, target[P - 1:, None]).sum())
    out = torch.stack(out)
    return out[0::2], out[1::2]


def _examples(model, processor, root, n=3):
    enc = PromptEncoder(processor, images=str(root / "images"), dtype=next(model.parameters()).dtype)
    recs = [r for r in data.iter_records(root / "in.jsonl")][:n]
    return [encode_pair(r, enc, 2048) for r in recs]


@pytest.mark.parametrize("share_prompt", [False, True], ids=["2N-sequences", "shared-prompt"])
@pytest.mark.parametrize("zero3", [False, True])
def test_pair_logps_equal_eager_and_encode_each_image_once(setup, zero3, share_prompt):
    """Log-probs and gradients equal the eager way's in float64. With the prompt shared by chosen and rejected,
    the gradients agree to float32 rounding only: Hugging Face's Llama RMSNorm computes in float32 even in a
    float64 model, and there the prompt's gradient from both responses is summed before that cast, not after
    (each response alone gives bit-identical gradients; the forward is bit-identical too)."""
    from mmalign.train.batches import shares_prompt

    root, model_dir = setup
    model, processor = load_model(model_dir, "cpu", torch.float64)
    assert shares_prompt(model)  # a LLaVA on a Llama with SDPA: the default path is the shared one
    examples = _examples(model, processor, root)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    pc, pr = pair_logps(model, examples, zero3=zero3, share_prompt=share_prompt)
    hook.remove()
    assert calls == [len(examples)]  # one call, each pair's image once (not once per response)
    (pc.sum() + 2 * pr.sum()).backward()
    ours = [p.grad.clone() for p in (model.lm_head.weight, model.model.multi_modal_projector.linear_1.weight)]
    model.zero_grad()
    ec, er = _eager_logps(model, examples)
    (ec.sum() + 2 * er.sum()).backward()
    torch.testing.assert_close(pc, ec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pr, er, rtol=1e-10, atol=1e-10)
    rtol, atol = (1e-6, 1e-6) if share_prompt else (1e-9, 1e-10)
    for g, p in zip(ours, (model.lm_head.weight, model.model.multi_modal_projector.linear_1.weight)):
        torch.testing.assert_close(g, p.grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind,transform", [("gemma2", dict(final_logit_softcapping=0.5)),
                                            ("cohere", dict(logit_scale=0.3)), ("granite", dict(logits_scaling=4.0))])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["2N-sequences", "shared-prompt"])
@pytest.mark.parametrize("zero3", [False, True])
def test_pair_logps_apply_the_familys_logit_transform(rng, kind, transform, share_prompt, zero3):
    """Families whose forward transforms the LM head's output (Gemma-2 soft-caps it, Cohere and Granite scale
    it; set far from neutral): the log-probs and gradients are those of the model's own logits (float64)."""
    from mmalign.train.batches import PairExample

    model = M.causal_lm(kind, 50, pad_token_id=0, bos_token_id=1, eos_token_id=2, **transform)
    ids = lambda n: torch.randint(3, 50, (n,), generator=rng).tolist()  # noqa: E731
    examples = [PairExample(i, str(i), torch.tensor(ids(4 + i)), {}, ids(3 + i), ids(5 - i)) for i in range(3)]
    pc, pr = pair_logps(model, examples, zero3=zero3, share_prompt=share_prompt)
    (pc.sum() + 2 * pr.sum()).backward()
    ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    ec, er = _eager_logps(model, examples)
    (ec.sum() + 2 * er.sum()).backward()
    # Gemma's RMSNorm computes in float32 even in a float64 model: batched (padded) and one-by-one sequences
    # then agree to float32 rounding only; so do the gradients of every family (their norms compute in float32
    # too) with the prompt shared, whose gradient from both responses is summed before that cast
    tight, fp32 = dict(rtol=1e-9, atol=1e-10), dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pc, ec, **(fp32 if kind == "gemma2" else tight))
    torch.testing.assert_close(pr, er, **(fp32 if kind == "gemma2" else tight))
    torch.testing.assert_close(ours, model.lm_head.weight.grad, **(fp32 if kind == "gemma2" or share_prompt else tight))


@pytest.mark.parametrize("share_prompt", [False, True], ids=["2N-sequences", "shared-prompt"])
def test_pair_logps_under_gradient_checkpointing(setup, share_prompt):
    """Gradient checkpointing reruns each decoder layer in the backward, with the shared prompt's 4D mask and
    position ids: log-probs and gradients are bit-identical to a run without it (float64)."""
    root, model_dir = setup
    model, processor = load_model(model_dir, "cpu", torch.float64)
    model.train()
    examples = _examples(model, processor, root)
    # the layer's first module: transformers checkpoints the layer's forward (not its hooks), and the recompute
    # stops once it has rebuilt the last tensor the backward needs (torch's checkpoint early stop)
    calls = []
    model.model.language_model.layers[0].input_layernorm.register_forward_hook(lambda *a: calls.append(1))

    def run():
        calls.clear()
        pc, pr = pair_logps(model, examples, share_prompt=share_prompt)
        (pc.sum() + 2 * pr.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return pc.detach(), pr.detach(), grads, len(calls)

    plain = run()
    enable_checkpointing(model)
    ckpt = run()
    assert (plain[3], ckpt[3]) == (1, 2)  # checkpointed: the layer's forward runs again in the backward
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[1], ckpt[1])
    assert plain[2].keys() == ckpt[2].keys() and len(plain[2]) > 20
    for name, g in plain[2].items():
        assert torch.equal(g, ckpt[2][name]), name


@pytest.mark.parametrize("train", ["default", "all"])
@pytest.mark.parametrize("stage", [0, 2])
def test_one_step_equals_plain_pytorch(setup, tmp_path, stage, train):
    """One step against plain PyTorch. By default the vision tower is frozen (the LLaVA / DAMO recipe): it is
    bit-identical after the step, holds no optimizer state, and the reference runs on the policy's own tower
    (shared, its output replayed: one tower forward per step)."""
    root, model_dir = setup
    base, processor = load_model(model_dir, "cpu", torch.float32)
    trainer = Trainer(_cfg(root, model_dir, tmp_path / "run", zero_stage=stage, beta=0.5, train=train),
                      model=copy.deepcopy(base), processor=processor)
    batch = trainer.micro_batch(0)
    tower = trainer.engine.module.model.vision_tower
    rows = trainer.train()
    manual = copy.deepcopy(base).train()
    frozen = train == "default"
    if frozen:
        manual.model.vision_tower.requires_grad_(False).eval()
        assert trainer.reference.model.vision_tower is tower  # shared, not copied
        assert [r.calls for r in trainer.replays] == [1]  # run once for the policy and the reference
        for (name, p), q in zip(tower.named_parameters(), base.model.vision_tower.parameters()):
            assert not p.requires_grad and torch.equal(p, q), name
        state = trainer.engine.optimizer.state_dict()
        held = {id(p) for group in trainer.engine.optimizer.param_groups for p in group["params"]}
        assert not any(id(p) in held for p in tower.parameters()) and state
    else:
        assert trainer.reference.model.vision_tower is not tower and not trainer.replays
    pc, pr = _eager_logps(manual, batch)
    with torch.no_grad():
        rc, rr = _eager_logps(base, batch)
    loss = -torch.nn.functional.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
    torch.optim.AdamW(manual.parameters(), lr=1e-3, weight_decay=0.0).step()
    assert rows[0]["loss"] == pytest.approx(loss.item(), rel=1e-6)
    compared = 0
    for (name, p), q in zip(trainer.engine.module.named_parameters(), manual.parameters()):
        if q.grad is None or q.grad.abs().max() < 1e-9:
            continue  # e.g. attention key biases: a zero gradient up to rounding, which Adam blows up to +-lr
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
        compared += 1
    assert compared > 20


def test_prefetch_changes_nothing(setup, tmp_path):
    """Encoding the next micro-batch in a background thread gives the same steps; an early stop and an
    encoding error end the thread and surface as they do without it."""
    import threading

    root, model_dir = setup
    kw = dict(loss="damo", micro_batch_size=2, grad_accum=2, max_steps=3, epochs=3, save_final=False)
    rows = {}
    for prefetch in (True, False):
        trainer = Trainer(_cfg(root, model_dir, tmp_path / str(prefetch), prefetch=prefetch, **kw))
        rows[prefetch] = [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in trainer.train()]
    assert len(rows[True]) == 3 and rows[True] == rows[False]
    stopped = Trainer(_cfg(root, model_dir, tmp_path / "stop", **kw)).train(callback=lambda t, row: row["step"] == 1)
    assert [r["step"] for r in stopped] == [1]
    assert not any(t.name.startswith("mmalign-encode") for t in threading.enumerate())
    for prefetch in (True, False):
        with pytest.raises(data.RecordError, match="max_length is 3"):
            Trainer(_cfg(root, model_dir, tmp_path / f"short{prefetch}", max_length=3, prefetch=prefetch)).train()


def test_resume_continues_exactly(setup, tmp_path):
    root, model_dir = setup
    kw = dict(zero_stage=2, loss="damo", micro_batch_size=2, grad_accum=2, lr=1e-3, epochs=3, save_every=2)
    whole = Trainer(_cfg(root, model_dir, tmp_path / "a", max_steps=4, **kw))
    whole.train()
    first = Trainer(_cfg(root, model_dir, tmp_path / "b", max_steps=2, **kw))
    first.train()
    resumed = Trainer(_cfg(root, model_dir, tmp_path / "b", max_steps=4, **kw))
    assert resumed.step == 2 and float(resumed.loss_fn.running_mean) == float(first.loss_fn.running_mean) != 0
    resumed.train()
    for p, q in zip(whole.engine.module.parameters(), resumed.engine.module.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    a = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    drop = ("pairs_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


def _port() -> int:
    """A port free now, for the two processes' rendezvous (a launcher's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, root, model_dir, out, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    t = Trainer(_cfg(root, model_dir, out, zero_stage=2, loss="damo", micro_batch_size=2, max_steps=2))
    rows = t.train()
    flat = torch.cat([p.detach().reshape(-1) for p in t.engine.module.parameters()])
    torch.save({"params": flat, "rows": rows, "g": float(t.loss_fn.running_mean)}, f"{out}/rank{rank}.pt")


def test_two_processes_equal_one(setup, tmp_path):
    import torch.multiprocessing as mp

    root, model_dir = setup
    out = tmp_path / "two"
    out.mkdir()
    mp.spawn(_rank_main, args=(root, model_dir, str(out), _port()), nprocs=2, join=True)
    r0, r1 = (torch.load(out / f"rank{i}.pt") for i in range(2))
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
    assert r0["g"] == r1["g"]
    single = Trainer(_cfg(root, model_dir, tmp_path / "one", zero_stage=2, loss="damo", micro_batch_size=4, max_steps=2))
    rows = single.train()
    flat = torch.cat([p.detach().reshape(-1) for p in single.engine.module.parameters()])
    # fp32 sums in other orders (other batch shapes, the all-reduce): Adam turns a gradient near its eps
    # (1e-8) into a step of up to lr = 1e-3, so rounding shows as ~1e-6; a wrong pair would be ~lr
    torch.testing.assert_close(r0["params"], flat, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in r0["rows"]] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    assert r0["g"] == pytest.approx(float(single.loss_fn.running_mean), rel=1e-5)


@pytest.mark.parametrize("job", ["train", "hardness", "bdhs"])
def test_every_job_checks_its_device_up_front(job):
    from mmalign.bdhs.job import BDHSJobConfig
    from mmalign.hardness.job import HardnessConfig

    make = {"train": lambda d: TrainConfig(model="m", data="x", device=d), "hardness": lambda d: HardnessConfig(device=d),
            "bdhs": lambda d: BDHSJobConfig(device=d)}[job]
    for bad in ("gpu0", "meta"):
        with pytest.raises(ValueError, match=f"device: expected 'cpu', 'cuda' or 'cuda:N', got '{bad}'"):
            make(bad).validate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda:0' asked for, but torch sees no CUDA device"):
            make("cuda:0").validate()
    make("cpu").validate()
    make(None).validate()


def test_device_and_process_group(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train_device(TrainConfig(device="cuda")) == torch.device("cuda:3")
    assert devices.default_device("cuda") == "cuda:3" and devices.default_device("cuda:1") == "cuda:1"  # every job
    assert train_device(TrainConfig(device="cpu")) == torch.device("cpu")
    # a single-process job binds no port (an in-memory store): a second job on the machine cannot collide with it
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_distributed(torch.device("cpu"))
    assert "MASTER_PORT" not in os.environ
    assert torch.distributed.get_backend() == "gloo" and torch.distributed.get_world_size() == 1


def test_precomputed_reference_and_cli(setup, tmp_path, capsys):
    root, model_dir = setup
    common = ["--model", model_dir, "--images", str(root / "images"), "--no-progress", "--device", "cpu"]
    ref = tmp_path / "ref.jsonl"
    assert main(["train", "--data", str(root / "in.jsonl"), "--precompute-reference", str(ref)] + common) == 0
    rows = [json.loads(x) for x in open(ref)]
    assert len(rows) == 8 and all(isinstance(r["ref_chosen_logp"], float) for r in rows)
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"loss": "ipo", "beta": 0.2, "micro_batch_size": 4, "max_steps": 1, "zero_stage": 2,
                                  "reference": "precomputed", "output_dir": str(tmp_path / "run")}))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--data", str(ref)] + common) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 1 and last["beta_mean"] == pytest.approx(0.2)
    assert main(["train", "--data", str(root / "in.jsonl"), "--reference", "precomputed", "--output-dir",
                 str(tmp_path / "x")] + common) == 2
    assert "has no ref_chosen_logp" in capsys.readouterr().err
    config.write_text(json.dumps({"los": "dpo"}))
    assert main(["train", "--config", str(config)] + common) == 2
    assert "unknown keys ['los']" in capsys.readouterr().err
    assert main(["train", "--data", str(ref), "--shard", "0/2", "--output-dir", str(tmp_path / "y")] + common) == 2
    assert "--shard: only with --precompute-reference" in capsys.readouterr().err


class _Killed(Exception):
    pass


def test_reference_pass_resumes_after_a_kill_shards_and_reports_bad_records(setup, tmp_path, monkeypatch):
    """The reference pass is a resumable job: killed after its first batch, the rerun computes only the rest and
    writes what an uninterrupted run writes; two shards give the same file; a record whose image is missing is
    skipped into OUT.failed.jsonl with the reason, not the end of the job."""
    from mmalign.train import reference

    root, model_dir = setup
    rows = fx.pairs(7) + [{**fx.pairs(1)[0], "id": "no-image", "image": "missing.png"}]
    fx.write_jsonl(tmp_path / "in.jsonl", rows)
    model, processor = load_model(model_dir, "cpu", torch.float32)
    cfg = _cfg(root, model_dir, tmp_path, data=str(tmp_path / "in.jsonl"))
    kw = dict(model=model, processor=processor, batch_size=3)
    assert reference.precompute_reference(cfg, str(tmp_path / "whole.jsonl"), **kw) == 7
    whole = [json.loads(x) for x in open(tmp_path / "whole.jsonl")]
    failed = [json.loads(x) for x in open(tmp_path / "whole.failed.jsonl")]
    assert [f["id"] for f in failed] == ["no-image"] and "missing.png" in failed[0]["error"]

    real, batches = reference._process, []

    def dies(batch, *a):
        if len(batches) == 1:
            raise _Killed
        batches.append([r.index for r in batch])
        return real(batch, *a)

    monkeypatch.setattr(reference, "_process", dies)
    with pytest.raises(_Killed):
        reference.precompute_reference(cfg, str(tmp_path / "out.jsonl"), **kw)
    assert not (tmp_path / "out.jsonl").exists()
    monkeypatch.setattr(reference, "_process",
                        lambda batch, *a: batches.append([r.index for r in batch]) or real(batch, *a))
    assert reference.precompute_reference(cfg, str(tmp_path / "out.jsonl"), **kw) == 7
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7]]  # the first batch is not computed again
    assert [json.loads(x) for x in open(tmp_path / "out.jsonl")] == whole
    assert reference.precompute_reference(cfg, str(tmp_path / "sh.jsonl"), shard="0/2", **kw) is None
    assert reference.precompute_reference(cfg, str(tmp_path / "sh.jsonl"), shard="1/2", **kw) == 7
    assert [json.loads(x) for x in open(tmp_path / "sh.jsonl")] == whole
    with pytest.raises(jobs.JobError, match="exists"):
        reference.precompute_reference(cfg, str(tmp_path / "sh.jsonl"), **kw)


def test_precomputed_reference_of_other_settings_is_refused(setup, tmp_path):
    """Reference log-probs carry what they were computed with (ref_config): another max_length or prompt template
    means other sequences (an error naming the record), another precision a warning."""
    from mmalign.train import precompute_reference

    root, model_dir = setup
    ref = tmp_path / "ref.jsonl"
    precompute_reference(_cfg(root, model_dir, tmp_path / "p", max_length=64), str(ref))
    row = json.loads(open(ref).readline())
    assert row["ref_config"]["max_length"] == 64 and row["ref_config"]["dtype"] == "float32"
    with pytest.raises(ValueError, match=r"record 0 .*computed with max_length=64 and this run has max_length=2048"):
        Trainer(_cfg(root, model_dir, tmp_path / "t", data=str(ref), reference="precomputed"))
    with pytest.raises(ValueError, match="computed with prompt_template=None"):
        Trainer(_cfg(root, model_dir, tmp_path / "t", data=str(ref), reference="precomputed", max_length=64,
                     prompt_template="Q: <image>\n{prompt} A:"))
    with pytest.warns(UserWarning, match="dtype='float32'.*this run has dtype='bfloat16'"):
        Trainer(_cfg(root, model_dir, tmp_path / "t", data=str(ref), reference="precomputed", max_length=64, bf16=True))


@pytest.mark.parametrize("bf16", [dict(bf16=True), dict(deepspeed={"bf16": {"enabled": True}}),
                                  dict(bf16=True, autocast=True),
                                  dict(deepspeed={"torch_autocast": {"enabled": True, "dtype": "bfloat16"}})],
                         ids=["flag", "deepspeed-json", "autocast-flag", "autocast-deepspeed-json"])
def test_precomputed_reference_in_the_training_dtype(setup, tmp_path, bf16):
    """The reference pass runs in the precision training gives the policy, whether bf16 (DeepSpeed's bf16 mode or
    torch.autocast) comes from the flags or from a DeepSpeed config: the first step's log-ratios are exactly 0."""
    from mmalign.train import precompute_reference

    root, model_dir = setup
    ref = tmp_path / "ref.jsonl"
    precompute_reference(_cfg(root, model_dir, tmp_path / "p", **bf16), str(ref))
    trainer = Trainer(_cfg(root, model_dir, tmp_path / "t", data=str(ref), reference="precomputed", **bf16))
    batch = trainer.micro_batch(0)
    pc, pr, rc, rr = trainer._logps(batch)
    assert torch.equal(pc, rc) and torch.equal(pr, rr)
    assert trainer.train()[0]["margin"] == 0


@pytest.mark.parametrize("damo,match", [({"kepp": 0.5}, "damo: kepp: unknown DAMO option"),
                                        ({"keep": "0.5"}, "damo: keep: expected a ratio"),
                                        ({"rho": 0.3}, "damo: rho: has no effect here"),
                                        ("keep=0.5", "damo: expected a mapping")])
def test_damo_options_are_checked_with_the_config(damo, match):
    """A typo or a bad value in the config's DAMO options is a one-line error when the config is validated, before
    any model is loaded (the CLI prints it and exits 2), not a TypeError at the first step."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(model="m", data="d", loss="damo", damo=damo).validate()
    TrainConfig(model="m", data="d", loss="damo", damo={"keep": 0.5, "combine": "sum", "rho": 0.3}).validate()


def test_autocast_options_are_checked(setup, tmp_path):
    root, model_dir = setup
    with pytest.raises(ValueError, match="autocast: .* set bf16=True"):
        _cfg(root, model_dir, tmp_path, autocast=True).validate()
    with pytest.raises(ValueError, match="autocast: with your own DeepSpeed config"):
        _cfg(root, model_dir, tmp_path, bf16=True, autocast=True, deepspeed={"zero_optimization": {"stage": 0}}).validate()
    with pytest.raises(ValueError, match="torch_autocast.dtype: .* got 'float16'"):
        Trainer(_cfg(root, model_dir, tmp_path, deepspeed={"torch_autocast": {"enabled": True, "dtype": "float16"}}))


def test_plot_command(tmp_path, capsys):
    for name, losses in (("a", [0.7, 0.6, 0.5]), ("b", [0.7, 0.65, 0.62])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "loss": x, "margin": 0.1 * i, "accuracy": 0.5}) + "\n" for i, x in enumerate(losses)))
    out = tmp_path / "m.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["plot", str(tmp_path / "a"), "--keys", "nope", "--out", str(out)]) == 2
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no metrics" in capsys.readouterr().err


def test_averaged_loss_with_online_bdhs(setup, tmp_path):
    pytest.importorskip("sentence_transformers")
    from mmalign import synthetic

    root, model_dir = setup
    st = synthetic.save_tiny_sentence_model(tmp_path / "st")
    online = dict(max_new_tokens=3, tries=1, rho_th=0.9)
    with pytest.raises(ValueError, match="reference='model'"):
        TrainConfig(model=model_dir, data="x", reference="precomputed", online_bdhs=online).validate()
    cfg = _cfg(root, model_dir, tmp_path / "a", zero_stage=2, online_bdhs=online, similarity_model=st, max_steps=2)
    trainer = Trainer(cfg)
    generated = []
    real = trainer._online_rejected

    def spy(batch, k):
        out = real(batch, k)
        generated.extend((b.rejected_ids, o.rejected_ids) for b, o in zip(batch, out))
        return out

    trainer._online_rejected = spy
    rows = trainer.train()
    assert len(rows) == 2 and len(generated) == 8 and any(a != b for a, b in generated)
    assert trainer.engine.module.training  # generation left the policy in train mode
    # with ỹ- = y- both terms of Eq. 5 are the same loss: the averaged loss equals the offline one
    same = Trainer(_cfg(root, model_dir, tmp_path / "b", zero_stage=2, online_bdhs=online, similarity_model=st,
                        averaged_gamma=0.3))
    same._online_rejected = lambda batch, k: batch
    plain = Trainer(_cfg(root, model_dir, tmp_path / "c", zero_stage=2))
    assert same.train()[0]["loss"] == pytest.approx(plain.train()[0]["loss"], rel=1e-6)


def test_mixed_dpo(setup, tmp_path):
    root, model_dir = setup
    with pytest.raises(ValueError, match="mixed_p"):
        TrainConfig(model=model_dir, data="x", reference="model", mixed_p=1.5).validate()
    calls = []

    def ranker(example, texts):  # an annotator that prefers the longer answer
        calls.append(texts)
        return int(len(texts[1]) > len(texts[0]))

    cfg = _cfg(root, model_dir, tmp_path / "m", zero_stage=2, mixed_p=0.5, mixed_max_new_tokens=4, max_steps=2)
    trainer = Trainer(cfg, ranker=ranker)
    batch = trainer.micro_batch(0)
    mixed = trainer._mixed(batch, 0)
    again = trainer._mixed(batch, 0)
    online = [m for m, b in zip(mixed, batch) if m.chosen_ids != b.chosen_ids]
    assert 0 < len(calls) == 2 * len(online) <= 8 and all(len(t) == 2 for t in calls)  # two _mixed calls
    assert [m.chosen_ids for m in mixed] == [m.chosen_ids for m in again]  # draws depend on (seed, k, pair) only
    for m in online:
        assert m.ref_chosen is None and m.chosen_ids[-1] == trainer.encoder.tokenizer.eos_token_id
    assert len(trainer.train()) == 2
    offline = Trainer(_cfg(root, model_dir, tmp_path / "o", zero_stage=2, mixed_p=1.0), ranker=ranker)
    assert [m.chosen_ids for m in offline._mixed(batch, 0)] == [b.chosen_ids for b in batch]


@pytest.mark.parametrize("options", [dict(zero_stage=3), dict(zero_stage=2, bf16=True),
                                     dict(bf16=True, autocast=True), dict(zero_stage=3, bf16=True, autocast=True),
                                     dict(zero_stage=2, offload_optimizer=True), dict(gradient_checkpointing=True),
                                     dict(bf16=True, autocast=True, gradient_checkpointing=True),
                                     dict(zero_stage=3, gradient_checkpointing=True)],
                         ids=["zero3", "bf16", "autocast", "autocast-zero3", "offload", "checkpointing",
                              "autocast-checkpointing", "zero3-checkpointing"])
def test_deepspeed_options_take_a_step(setup, tmp_path, options):
    """ZeRO-3 (the head runs as a module on response positions), bf16 (DeepSpeed's bf16 mode, or fp32 weights
    under torch.autocast), optimizer offload and gradient checkpointing each train, starting from the same loss
    as plain ZeRO-0."""
    root, model_dir = setup
    base = Trainer(_cfg(root, model_dir, tmp_path / "base", loss="damo", micro_batch_size=4, max_steps=2)).train()
    trainer = Trainer(_cfg(root, model_dir, tmp_path / "opt", loss="damo", micro_batch_size=4, max_steps=2, **options))
    assert trainer.zero3 == (options.get("zero_stage") == 3)
    if trainer.zero3:  # the live reference is partitioned like the policy: no rank holds it whole
        assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in trainer.reference.parameters())
    if trainer.reference is not None and not trainer.zero3 and not options.get("autocast"):
        # bf16: cast like the policy, not left in fp32
        assert {p.dtype for p in trainer.reference.parameters()} == {p.dtype for p in trainer.engine.module.parameters()}
    if options.get("autocast"):  # fp32 weights; the reference's linear layers in bf16 (what autocast runs them in)
        assert "torch_autocast" in trainer.ds_config and not trainer.ds_config["bf16"]["enabled"]
        assert {p.dtype for p in trainer.engine.module.parameters()} == {torch.float32}
        if not trainer.zero3:
            shared = set(trainer.reference.model.vision_tower.modules())  # the policy's frozen tower, not a copy
            for module in set(trainer.reference.modules()) - shared:
                want = torch.bfloat16 if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) else torch.float32
                assert all(p.dtype == want for p in module.parameters(recurse=False)), module
    rows = trainer.train()
    # both start from the reference, in every precision: the log-ratios are 0 and the loss is log 2
    assert rows[0]["margin"] == 0 and rows[0]["loss"] == pytest.approx(base[0]["loss"], rel=1e-6)
    assert rows[1]["loss"] < rows[0]["loss"] and rows[1]["margin"] > 0


def test_example_configs_load(tmp_path):
    """The example configs in examples/ are valid TrainConfig files and DeepSpeed configs."""
    import pathlib

    from mmalign.train import deepspeed_config

    examples = pathlib.Path(__file__).resolve().parents[2] / "examples"
    configs = sorted(examples.glob("train/*.yaml")) + sorted((examples.parent / "recipes").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        cfg = TrainConfig.from_file(str(path))
        cfg.validate()
        if isinstance(cfg.deepspeed, str):
            cfg.deepspeed = str(examples.parent / cfg.deepspeed)
        ds = deepspeed_config(cfg)
        assert ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch_size
    for path in sorted(examples.glob("deepspeed/*.json")):
        assert "zero_optimization" in json.loads(path.read_text())


@pytest.mark.parametrize("sizes", [([32, 64], [64, 32]), ([32, 64], [32, 32])], ids=["tiles-stack", "tiles-differ"])
def test_pair_logps_on_llava_next(rng, sizes):
    """LLaVA-1.6 (AnyRes tiles, image_sizes) goes through the same path: equal to the eager log-probs. Images
    with equal tile counts are encoded in one vision-tower call, different counts one pair at a time."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from mmalign.train import PairExample

    tok = M.tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    image = tok.convert_tokens_to_ids("<image>")
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image,
                          image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(cfg).double()
    examples = []
    for i, size in enumerate(sizes):
        tiles = 1 + (size[0] // 32) * (size[1] // 32)  # the base image and the grid's tiles
        px, hw = torch.randn(1, tiles, 3, 32, 32, generator=rng, dtype=torch.float64), torch.tensor([size])
        n = model.model.get_image_features(pixel_values=px, image_sizes=hw).pooler_output[0].shape[0]
        prompt = M.prompt_ids(tok, "Describe the image .", n)
        resp = lambda k: torch.randint(4, image, (k,), generator=rng).tolist() + [tok.eos_token_id]  # noqa: E731
        examples.append(PairExample(i, f"p{i}", prompt, {"pixel_values": px, "image_sizes": hw}, resp(5 + i), resp(7)))
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    pc, pr = pair_logps(model, examples)
    hook.remove()
    assert len(calls) == (1 if sizes[0] == sizes[1][::-1] else 2)
    ec, er = _eager_logps(model, examples)
    torch.testing.assert_close(torch.stack([pc, pr]), torch.stack([ec, er]), rtol=1e-10, atol=1e-10)


def test_prompt_encoder_uses_the_processor_chat_template(setup):
    from transformers import AutoProcessor

    root, model_dir = setup
    processor = AutoProcessor.from_pretrained(model_dir)
    plain = PromptEncoder(processor)
    assert plain.text("Describe the image .") == "USER: <image>\nDescribe the image . ASSISTANT:"
    processor.chat_template = ("{% for m in messages %}{{ m['role'] }} {% for c in m['content'] %}{% if c['type'] == "
                               "'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                               "{% if add_generation_prompt %} ASSISTANT :{% endif %}")
    assert PromptEncoder(processor).text("Describe it") == "user <image> Describe it ASSISTANT :"


def test_shared_prompt_layout():
    """One row per pair [prompt | chosen | rejected]: causal, rejected blind to chosen, rejected's positions resume
    after the prompt, each response token predicted by the row before it (the first by the prompt's last row),
    padding rows see only themselves; an empty response takes no row."""
    from mmalign.models import DecoderCall
    from mmalign.train.batches import PairExample, _shared_targets

    ex = [PairExample(0, "a", torch.tensor([5, 6, 7]), {}, [8, 9], [], None),
          PairExample(1, "b", torch.tensor([5]), {}, [3], [4, 6], None)]
    blind, at, labels = _shared_targets(ex, "cpu")
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]).bool()
    call = DecoderCall(torch.zeros(2, 5, 1), torch.arange(5).expand(1, 2, 5), valid)
    call = call.resume(torch.tensor([5, 2]), torch.tensor([2, 1])).restrict(blind, dtype=torch.float32, additive=True)
    seen = (call.masks[:, 0] == 0).int()
    assert seen[0].tolist() == torch.ones(5, 5, dtype=torch.int).tril().tolist()
    assert seen[1].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert call.positions[0].masked_fill(~valid, -1).tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 2, -1]]
    assert at.tolist() == [[2, 3], [0, 0], [0, 0], [0, 2]]
    assert labels.tolist() == [[8, 9], [-100, -100], [3, -100], [4, 6]]
