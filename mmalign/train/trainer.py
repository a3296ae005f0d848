"""A thin DPO-family trainer on DeepSpeed (``mmalign train``).

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` pairs per rank. Each
micro-batch: policy log-probs (:func:`.batches.pair_logps`: vision once per pair, fused log-probs on
the final hidden states), reference log-probs (precomputed in the data, or a frozen copy of the initial
policy), then the loss: every loss is :class:`mmalign.nn.DAMOLoss` with a preset (dpo, ipo and hinge are
the ``dpo`` preset with that loss type; d2po, mdpo, damo as in SPEC.md §5); with several ranks the
DAMO statistics are taken over the global micro-batch (all-gathered margins).

DeepSpeed does the rest: ZeRO 0-3, bf16, optimizer offload, gradient accumulation (``engine.backward``
scales, ``engine.step`` steps at the boundary), checkpoints. A checkpoint holds the model, optimizer
and scheduler (DeepSpeed's), plus the loss module's state (DAMO running mean and step), the trainer
step and the RNG states: data order is a function of (seed, epoch), so a resumed run continues exactly
as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data, jobs
from ..nn import DAMOLoss
from ..ops.damo_step import DAMOConfig
from ..models import PromptEncoder, load_model
from .batches import PairExample, encode_pair, pair_logps, to_device, with_responses

# the per-micro-step metrics (Trainer.micro_step), in the order they are read back from the device
METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "alpha_m", "kept", "beta_mean", "beta_min",
           "beta_max", "running_mean")
# loss name -> (DAMO preset, loss type)
LOSSES = {"dpo": ("dpo", "sigmoid"), "ipo": ("dpo", "ipo"), "hinge": ("dpo", "hinge"),
          "d2po": ("d2po", "sigmoid"), "mdpo": ("mdpo", "sigmoid"), "damo": ("damo", "sigmoid")}


@dataclass
class TrainConfig:
    model: str | None = None            # local Hugging Face model directory
    data: str | None = None             # preference data (any input `mmalign hardness` reads)
    images: str | None = None
    output_dir: str = "runs/mmalign"
    deepspeed: str | dict | None = None  # a DeepSpeed JSON (path or dict), taken as is; "auto" values filled
    zero_stage: int = 0                 # used when no DeepSpeed config is given
    bf16: bool = False
    autocast: bool = False              # with bf16: fp32 weights, the forward under torch.autocast (DeepSpeed's
                                        # torch_autocast); default: DeepSpeed's bf16 mode (bf16 weights + fp32 master)
    device: str | None = None           # "cpu", "cuda" (= cuda:LOCAL_RANK) or "cuda:N"; None: the GPU when there is one
    offload_optimizer: bool = False
    loss: str = "dpo"
    beta: float = 0.1
    damo: dict = field(default_factory=dict)  # more DAMOConfig fields: variant, selection, keep, gamma, ...
    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 4           # pairs per rank per micro-batch
    grad_accum: int = 1
    max_length: int = 2048
    gradient_checkpointing: bool = False
    reference: str = "precomputed"      # "precomputed" (ref_*_logp in the data) or "model" (frozen initial policy)
    prompt_template: str | None = None
    layout: str = "auto"
    columns: dict | None = None
    seed: int = 0
    log_every: int = 1
    save_every: int | None = None       # optimizer steps
    save_final: bool = True             # a checkpoint at the end of train()
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True            # also log to OUTPUT/tensorboard when the tensorboard package is installed
    online_bdhs: dict | None = None     # BDHSConfig fields: enables the averaged loss of SPEC.md §6 (Eq. 5)
    averaged_gamma: float = 0.5         # γ of Eq. 5: γ·L(y+, y-) + (1-γ)·L(y+, ỹ-)
    similarity_model: str = "sentence-transformers/all-mpnet-base-v2"  # online BDHS gate; Mixed-DPO's default ranker
    mixed_p: float | None = None        # Mixed-DPO (Eq. 4): keep the offline pair with probability p, else an online one
    mixed_max_new_tokens: int = 64      # length of the two responses sampled from the policy
    prefetch: bool | None = None        # encode micro-batch k+1 in a background thread while k trains; None: on a GPU

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.reference not in ("precomputed", "model"):
            raise ValueError(f"reference: expected 'precomputed' or 'model', got {self.reference!r}")
        for name in ("micro_batch_size", "grad_accum", "epochs", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if not self.beta > 0 or not self.lr > 0:
            raise ValueError(f"beta and lr: expected > 0, got {self.beta}, {self.lr}")
        if not 0.0 <= self.averaged_gamma <= 1.0:
            raise ValueError(f"averaged_gamma: expected a value in [0, 1], got {self.averaged_gamma}")
        if self.mixed_p is not None and not 0.0 <= self.mixed_p <= 1.0:
            raise ValueError(f"mixed_p: expected a probability in [0, 1], got {self.mixed_p}")
        if self.mixed_p is not None and self.reference != "model":
            raise ValueError("mixed_p: online pairs need live reference log-probs: use reference='model'")
        jobs.check_device(self.device)
        if self.autocast and not self.bf16:
            raise ValueError("autocast: it is bf16 mixed precision through torch.autocast: set bf16=True as well")
        if self.autocast and self.deepspeed is not None:
            raise ValueError("autocast: with your own DeepSpeed config, enable its torch_autocast section instead "
                             '({"torch_autocast": {"enabled": true, "dtype": "bfloat16"}})')
        if self.online_bdhs is not None and self.reference != "model":
            raise ValueError("online_bdhs: the online rejected responses need live reference log-probs: "
                             "use reference='model'")
        if not isinstance(self.damo, dict):
            raise ValueError(f"damo: expected a mapping of DAMO options, got {type(self.damo).__name__}")
        preset, loss_type = LOSSES[self.loss]
        try:
            DAMOConfig.from_preset(preset, loss_type=loss_type, **self.damo)
        except (TypeError, ValueError) as e:
            raise ValueError(f"damo: {e}") from None

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        """A JSON or YAML file whose keys are the fields of this class."""
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def loss_module(cfg: TrainConfig) -> DAMOLoss:
    preset, loss_type = LOSSES[cfg.loss]
    return DAMOLoss(cfg.beta, DAMOConfig.from_preset(preset, loss_type=loss_type, **cfg.damo), seed=cfg.seed)


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The user's DeepSpeed config as is (``"auto"`` values filled from ``cfg``), or one built from ``cfg``."""
    if cfg.deepspeed is None:
        ds = {"zero_optimization": {"stage": cfg.zero_stage}, "bf16": {"enabled": cfg.bf16 and not cfg.autocast},
              "gradient_clipping": 1.0}
        if cfg.autocast:
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if cfg.offload_optimizer:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    else:
        ds = copy.deepcopy(cfg.deepspeed) if isinstance(cfg.deepspeed, dict) else json.loads(Path(cfg.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = cfg.bf16
    ds.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is torch's AdamW ...
    if _offloads(ds) and train_device(cfg).type != "cuda":
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also offloaded when training on the CPU
    ds.setdefault("steps_per_print", 10**9)
    return ds


def training_dtype(ds: dict, model: torch.nn.Module | None = None) -> torch.dtype:
    """The dtype the policy runs in under DeepSpeed: bf16 or fp16 when the config enables it (DeepSpeed casts
    the model), else the model's own floating dtype (float32 for a model still to be loaded)."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds.get(key) or {}).get("enabled") is True:
            return dtype
    params = model.parameters() if model is not None else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def autocast_dtype(ds: dict) -> torch.dtype | None:
    """bf16 when the DeepSpeed config enables ``torch_autocast`` (fp32 weights, the forward under torch.autocast),
    else None."""
    section = ds.get("torch_autocast") or {}
    if section.get("enabled") is not True:
        return None
    name = str(section.get("dtype", "bfloat16")).replace("torch.", "")
    if name not in ("bfloat16", "bf16"):
        raise ValueError(f"torch_autocast.dtype: mmalign's trainer supports bfloat16 (fp16 would need loss "
                         f"scaling), got {section.get('dtype')!r}")
    return torch.bfloat16


# the modules whose weights torch.autocast runs in bf16 (DeepSpeed's lower-precision-safe default list)
AUTOCAST_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def cast_like_training(model: torch.nn.Module, dtype: torch.dtype, autocast: torch.dtype | None = None):
    """Cast ``model``'s parameters in place as training computes with the policy's, so that the reference gives
    the policy's log-probs at step 0: all to ``dtype`` (DeepSpeed's bf16 mode casts the policy so; buffers such as
    rotary frequencies keep theirs), or under autocast only the weights autocast runs in ``autocast``
    (linear and convolution layers), the rest kept in fp32 like the policy's."""
    for module in model.modules():
        target = dtype if autocast is None else (autocast if isinstance(module, AUTOCAST_MODULES) else None)
        for p in module.parameters(recurse=False):
            if target is not None and p.is_floating_point():
                p.data = p.data.to(target)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face gradient checkpointing: each decoder layer keeps its input only and runs its forward again in
    the backward (one more forward of the policy per step; activations fall from all of each layer's to its
    input's). transformers >= 5.2x names it activation_checkpointing_enable (the old name warns)."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def _frozen_copy(model: torch.nn.Module, dtype: torch.dtype, autocast: torch.dtype | None = None) -> torch.nn.Module:
    """The live reference: a frozen copy of the initial policy, cast by :func:`cast_like_training`."""
    return cast_like_training(copy.deepcopy(model).eval().requires_grad_(False), dtype, autocast)


def forward_precision(device: torch.device, autocast: torch.dtype | None):
    """The context the policy and reference forwards run in: torch.autocast in autocast mode, else none."""
    return torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()


def _offloads(ds: dict) -> bool:
    device = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def train_device(cfg: TrainConfig) -> torch.device:
    """cfg.device ("cuda" alone means this process's GPU, cuda:LOCAL_RANK), else the GPU when there is one."""
    return torch.device(jobs.default_device(cfg.device))


def _use_accelerator(device: torch.device) -> None:
    """DeepSpeed puts the model, ZeRO's buffers and the process group's device on its accelerator, which it
    picks once per process (CUDA wherever there is a GPU). Make it the trainer's device, so that
    ``device="cpu"`` trains on the CPU also on a GPU machine."""
    from deepspeed.accelerator import get_accelerator, set_accelerator

    if get_accelerator().device_name() == device.type:
        return
    if device.type == "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator as Accelerator
    else:
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator as Accelerator
    set_accelerator(Accelerator())


def _init_distributed(device: torch.device):
    """The process group: as a launcher (torchrun, deepspeed) set it up, else a group of one over an in-memory
    store, which binds no port (two single-process jobs on one machine, or a port picked free and taken by
    another process before it is bound, cannot collide). NCCL for GPUs, gloo on CPU."""
    import deepspeed

    _use_accelerator(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    launched = "MASTER_PORT" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1"
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if not launched and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launched)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class Trainer:
    """``Trainer(cfg).train()``; ``model``/``processor`` objects may replace ``cfg.model``."""

    def __init__(self, cfg: TrainConfig, *, model=None, processor=None, ranker=None):
        cfg.validate()
        self.cfg = cfg
        self.device = device = train_device(cfg)
        self.rank, self.world = _init_distributed(device)
        if model is None:
            if not cfg.model:
                raise ValueError("model: give a local Hugging Face model directory")
            model, processor = load_model(cfg.model, str(device), torch.float32)
        elif processor is None:
            raise ValueError("processor: give the model's processor (or tokenizer) with the model")
        model.train()
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.ds_config = deepspeed_config(cfg)
        dtype = training_dtype(self.ds_config, model)
        self.autocast = autocast_dtype(self.ds_config)
        self.reference = None
        if cfg.reference == "model":
            self.reference = _frozen_copy(model, dtype, self.autocast)
        self.encoder = PromptEncoder(processor, template=cfg.prompt_template, images=cfg.images, device=device,
                                     dtype=dtype)
        self.records, self.skipped = self._load_records()
        self.loss_fn = loss_module(cfg).to(device)
        self.zero3 = int(self.ds_config.get("zero_optimization", {}).get("stage", 0)) == 3
        self.engine = self._engine(model)
        if self.reference is not None and self.zero3:
            self.reference = self._sharded_reference(self.reference)
        if cfg.online_bdhs is not None and self.zero3:
            raise ValueError("online_bdhs: generation from a ZeRO-3-partitioned policy is not supported; use ZeRO 0-2")
        similarity = None  # one sentence model serves the BDHS gate and Mixed-DPO's default ranker
        if cfg.online_bdhs is not None or (cfg.mixed_p is not None and ranker is None):
            from ..bdhs import SentenceSimilarity

            similarity = SentenceSimilarity(cfg.similarity_model, device=str(device))
        self.ranker = ranker
        if cfg.mixed_p is not None and ranker is None:
            self.ranker = SimilarityRanker(similarity)
        self.online = None
        if cfg.online_bdhs is not None:
            from ..bdhs import BDHSConfig

            self.online = (BDHSConfig(**cfg.online_bdhs), similarity, loss_module(cfg).to(device))
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if cfg.resume and (self.ckpt_dir / "latest").exists():
            self._load_checkpoint()

    # ------------------------------------------------------------------------------------- setup
    def _load_records(self):
        if not self.cfg.data:
            raise ValueError("data: give a preference dataset")
        records, skipped = [], []
        for rec in data.iter_records(self.cfg.data, layout=self.cfg.layout, columns=self.cfg.columns):
            (skipped if isinstance(rec, data.RecordError) else records).append(rec)
        if skipped and self.rank == 0:
            print(f"train: skipping {len(skipped)} unreadable records, first: {skipped[0]}", file=sys.stderr)
        if self.cfg.reference == "precomputed":
            lacking = next((r for r in records if r.extra.get("ref_chosen_logp") is None
                            or r.extra.get("ref_rejected_logp") is None), None)
            if lacking is not None:
                raise ValueError(f"reference='precomputed' but {lacking.where()} has no ref_chosen_logp/"
                                 "ref_rejected_logp: run `mmalign train --precompute-reference` first, or use "
                                 "reference='model'")
            from .reference import check_reference_config

            check_reference_config(records, self.cfg, training_dtype(self.ds_config), self.autocast)
        if len(records) < self.cfg.micro_batch_size * self.world:
            raise ValueError(f"data: {len(records)} usable pairs, fewer than one global micro-batch "
                             f"({self.cfg.micro_batch_size} x {self.world} ranks)")
        return records, skipped

    def _engine(self, model):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        if _offloads(self.ds_config) and self.device.type == "cuda":  # ZeRO-Offload's own CPU Adam (compiled once)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, adamw_mode=True)
        else:  # fused: one kernel per step, no full-size temporaries (foreach's took 4 bytes per parameter)
            optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, fused=True)
        warm = self.cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=self.ds_config)
        if self.world == 1 and not self.ds_config.get("zero_optimization", {}).get("stage", 0):
            # one process, no ZeRO: DeepSpeed's all-reduce of the gradients would only copy all of them into a
            # flat buffer and back (4 bytes per fp32 parameter at the peak)
            engine.enable_backward_allreduce = False
        return engine

    def _sharded_reference(self, reference):
        """Under ZeRO-3 the frozen reference is partitioned too (an inference-only DeepSpeed engine), so no rank
        holds a full copy; its parameters are gathered module by module as it runs."""
        import deepspeed

        ds = {k: v for k, v in self.ds_config.items() if k in ("train_micro_batch_size_per_gpu", "bf16", "fp16",
                                                                  "gradient_accumulation_steps", "torch_autocast")}
        ds["zero_optimization"] = {"stage": 3}
        engine, _, _, _ = deepspeed.initialize(model=reference, config=ds)
        return engine.module.eval()

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.records) // (self.cfg.micro_batch_size * self.world)

    @property
    def total_steps(self) -> int:
        steps = self.cfg.epochs * (self.micro_batches_per_epoch // self.cfg.grad_accum)
        return min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def micro_batch(self, k: int) -> list[PairExample]:
        """The k-th micro-batch of this rank: a function of (seed, epoch, k) only."""
        per_epoch, n = self.micro_batches_per_epoch, self.cfg.micro_batch_size
        epoch, j = divmod(k, per_epoch)
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        start = (j * self.world + self.rank) * n
        return [encode_pair(self.records[i], self.encoder, self.cfg.max_length) for i in order[start:start + n].tolist()]

    def micro_batches(self, start: int, stop: int):
        """``(k, micro_batch(k))`` for k in [start, stop). With ``cfg.prefetch`` (default: when training on a GPU,
        whose host otherwise waits for it; on a CPU the thread only competes with the training for the cores),
        micro-batch k+1 is encoded (tokenizer, image processor, copy to the device) in one background thread
        while k trains: the batches are the same either way. Not in the online modes (Mixed-DPO, online BDHS),
        where the training thread tokenizes generated text with the same tokenizer."""
        prefetch = self.device.type == "cuda" if self.cfg.prefetch is None else self.cfg.prefetch
        if not prefetch or self.online is not None or self.cfg.mixed_p is not None:
            yield from ((k, self.micro_batch(k)) for k in range(start, stop))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="mmalign-encode") as pool:
            ahead = pool.submit(self.micro_batch, start) if start < stop else None
            for k in range(start, stop):
                batch = ahead.result()  # re-raises an encoding error (a record that does not fit) here
                ahead = pool.submit(self.micro_batch, k + 1) if k + 1 < stop else None
                yield k, batch

    # ---------------------------------------------------------------------------------- one step
    def _reference_logps(self, batch: list[PairExample]):
        if self.reference is None:
            ref = torch.tensor([[e.ref_chosen for e in batch], [e.ref_rejected for e in batch]], dtype=torch.float32)
            return to_device(ref, self.device).unbind(0)
        with torch.no_grad():
            return pair_logps(self.reference, batch, zero3=self.zero3)

    def _logps(self, batch: list[PairExample]):
        """(policy chosen, policy rejected, reference chosen, reference rejected) sequence log-probs, float32."""
        with forward_precision(self.device, self.autocast):
            pc, pr = pair_logps(self.engine.module, batch, zero3=self.zero3)
            rc, rr = self._reference_logps(batch)
        return pc.float(), pr.float(), rc.float(), rr.float()

    @torch.no_grad()
    def reward_margins(self, examples: list[PairExample]) -> torch.Tensor:
        """β·(logr_w - logr_l) per pair under the current policy (the implicit reward margin)."""
        pc, pr, rc, rr = self._logps(examples)
        return self.cfg.beta * ((pc - rc) - (pr - rr))

    def _loss(self, loss_fn, batch: list[PairExample]):
        logps = self._logps(batch)
        alpha_d = None
        if all(e.alpha_d is not None for e in batch):
            alpha_d = to_device(torch.tensor([e.alpha_d for e in batch], dtype=torch.float32), self.device)
        group = torch.distributed.group.WORLD if self.world > 1 else None
        return loss_fn(*logps, alpha_d=alpha_d, group=group)

    def _online_rejected(self, batch: list[PairExample], k: int) -> list[PairExample]:
        """ỹ- for every pair, generated by BDHS from the current policy (SPEC.md §6-7)."""
        from ..bdhs import BDHSEngine, PairInput

        cfg, similarity, _ = self.online
        policy = self.engine.module
        engine = BDHSEngine(policy, self.encoder.tokenizer, similarity,
                            dataclasses.replace(cfg, seed=cfg.seed * 1_000_003 + k))
        try:
            results = engine.generate([PairInput(e.id, e.prompt_ids, e.chosen, e.image_inputs) for e in batch])
        finally:
            policy.train()
        return [with_responses(e, self.encoder.tokenizer, self.cfg.max_length, rejected=r.rejected)
                for e, r in zip(batch, results)]

    def _mixed(self, batch: list[PairExample], k: int) -> list[PairExample]:
        """Eq. 4: each pair stays offline with probability p, else becomes two responses sampled from the
        policy, ordered by the ranker. Draws depend only on (seed, micro-batch, pair)."""
        policy, tok = self.engine.module, self.encoder.tokenizer
        out = []
        for ex in batch:
            rng = random.Random(hash((self.cfg.seed, k, ex.index)) & 0xFFFFFFFF)
            if rng.random() < self.cfg.mixed_p:
                out.append(ex)
                continue
            ids = ex.prompt_ids.to(self.device)[None]
            policy.eval()
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(rng.getrandbits(63))
                    gen = policy.generate(input_ids=ids.expand(2, -1), **{
                        key: torch.cat([v, v]) for key, v in ex.image_inputs.items()}, do_sample=True,
                        max_new_tokens=self.cfg.mixed_max_new_tokens, pad_token_id=tok.pad_token_id)
            finally:
                policy.train()
            texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            best = int(self.ranker(ex, texts))
            out.append(with_responses(ex, tok, self.cfg.max_length, chosen=texts[best], rejected=texts[1 - best]))
        return out

    def micro_step(self, batch: list[PairExample], k: int = 0) -> dict:
        if self.cfg.mixed_p is not None:
            batch = self._mixed(batch, k)
        out = self._loss(self.loss_fn, batch)
        loss = out.loss
        if self.online is not None:  # Eq. 5: γ·L(y+, y-) + (1-γ)·L(y+, ỹ-)
            online = self._loss(self.online[2], self._online_rejected(batch, k))
            loss = self.cfg.averaged_gamma * loss + (1 - self.cfg.averaged_gamma) * online.loss
        # the ranks' losses sum to the global loss and DeepSpeed averages gradients over ranks: scale back
        self.engine.backward(loss * self.world)
        total = loss.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        m = out
        values = torch.stack([t.float() for t in (
            total, m.chosen_rewards.mean(), m.rejected_rewards.mean(), m.margins.mean(), m.accuracies.float().mean(),
            m.alpha_m, m.keep.sum(), m.beta.mean(), m.beta.min(), m.beta.max(), self.loss_fn.running_mean)])
        row = dict(zip(METRICS, values.tolist()))  # one copy to the host, one synchronization
        row["kept"] = int(row["kept"])
        return row

    def train(self, callback=None) -> list[dict]:
        """Run to ``total_steps`` (from the checkpoint when resuming); returns this run's metric rows.
        ``callback(trainer, row)`` runs after every optimizer step (evaluation, early stopping: return True)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        writer = self._tensorboard()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train",
                   disable=not cfg.progress or self.rank != 0, file=sys.stderr, dynamic_ncols=True)
        started = time.time()
        batches = self.micro_batches(self.step * cfg.grad_accum, self.total_steps * cfg.grad_accum)
        try:
            rows = self._train_loop(batches, bar, writer, callback)
        finally:
            batches.close()  # an early stop (callback) or an error: the encoding thread finishes and exits
        bar.close()
        if writer is not None:
            writer.close()
        if cfg.save_final and (not rows or not (cfg.save_every and self.step % cfg.save_every == 0)):
            self.save_checkpoint()
        if self.rank == 0 and rows:
            print(f"train: {len(rows)} steps in {time.time() - started:.1f} s, last loss {rows[-1]['loss']:.4f}",
                  file=sys.stderr)
        return rows

    def _train_loop(self, batches, bar, writer, callback) -> list[dict]:
        """Optimizer steps until total_steps or until ``callback`` says stop; the metric rows."""
        cfg, rows = self.cfg, []
        while self.step < self.total_steps:
            t0, micro = time.time(), []
            for _ in range(cfg.grad_accum):
                k, batch = next(batches)
                micro.append(self.micro_step(batch, k))
                self.engine.step()
            self.step += 1
            row = {"step": self.step, **{k: sum(m[k] for m in micro) / len(micro) for k in micro[0]},
                   "lr": self.engine.get_lr()[0],
                   "pairs_per_s": cfg.grad_accum * cfg.micro_batch_size * self.world / (time.time() - t0)}
            row["kept"], row["running_mean"] = micro[-1]["kept"], micro[-1]["running_mean"]
            rows.append(row)
            if self.rank == 0 and self.step % cfg.log_every == 0:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for key, value in row.items():
                        if key != "step":
                            writer.add_scalar(f"train/{key}", value, self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", refresh=False)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
            if callback is not None and callback(self, row):
                break
        return rows

    def _tensorboard(self):
        if not self.cfg.tensorboard or self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        state = {"step": self.step, "loss_fn": self.loss_fn.state_dict(),
                 "loss_online": self.online[2].state_dict() if self.online else None,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step}", client_state=state)

    def _load_checkpoint(self) -> None:
        _, state = self.engine.load_checkpoint(str(self.ckpt_dir))
        self.step = int(state["step"])
        self.loss_fn.load_state_dict(state["loss_fn"])
        if self.online and state.get("loss_online") is not None:
            self.online[2].load_state_dict(state["loss_online"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if self.rank == 0:
            print(f"train: resumed from {self.ckpt_dir} at step {self.step}", file=sys.stderr)


class SimilarityRanker:
    """Mixed-DPO's default annotator: prefers the sampled response closer to the dataset's chosen answer
    (sentence-embedding cosine). Any callable ``(example, [text_a, text_b]) -> index of the preferred``
    (a reward model, an LLM judge) can replace it: ``Trainer(cfg, ranker=...)``."""

    def __init__(self, similarity):
        self.similarity = similarity

    def __call__(self, example: PairExample, texts: list[str]) -> int:
        sims = self.similarity(texts, [example.chosen] * len(texts))
        return int(torch.argmax(sims))
