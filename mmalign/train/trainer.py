"""A thin DPO-family trainer on DeepSpeed (``mmalign train``): the loop and its checkpoints.

One optimizer step = ``grad_accum`` micro-batches of ``micro_batch_size`` pairs per rank. Each micro-batch: policy
log-probs (:func:`.batches.pair_logps`: vision once per pair, the prompt once per pair, fused log-probs on the final
hidden states), reference log-probs (precomputed in the data; a frozen copy of the initial policy sharing its
frozen vision tower; or, with LoRA, the base with the adapters off), then the loss: every loss is
:class:`mmalign.nn.DAMOLoss` with a preset (dpo, ipo and hinge are the ``dpo`` preset with that loss type; d2po,
mdpo, damo as in docs/math.md §5); with several ranks the DAMO statistics are taken over the global micro-batch
(all-gathered margins, the process group passed explicitly).

What trains, LoRA and the reference: :mod:`.policy`; parameter groups and the schedule: :mod:`.optim`; DeepSpeed,
precision and the device: :mod:`.runtime`; held-out metrics: :mod:`.evaluation`; the metrics log: :mod:`.logs`.
DeepSpeed does the rest: ZeRO 0-3, bf16, optimizer offload, gradient accumulation (``engine.backward`` scales,
``engine.step`` steps at the boundary), gradient clipping, checkpoints. A checkpoint holds the model, optimizer and
scheduler (DeepSpeed's), the loss module's state (DAMO running mean and step), the trainer step and the RNG states:
data order is a function of (seed, epoch), so a resumed run continues exactly as an uninterrupted one, and its
metrics log is cut back to the checkpoint first (nothing logged twice).
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import data
from ..models import PromptEncoder, load_model, reference_adapter
from . import online
from .batches import PairExample, encode_pair, pair_logps, to_device
from .config import TrainConfig, loss_module
from .evaluation import HeldOut, hold_out
from .logs import MetricsLog
from .optim import lr_factor, optimizer, param_groups
from .policy import (apply_lora, check_quantization, choose_trainable, frozen_modules, frozen_reference,
                     quantization_kwargs, save_adapter)
from .runtime import (autocast_dtype, deepspeed_config, enable_checkpointing, forward_precision, init_distributed,
                      offloads, train_device, training_dtype, zero_stage)

# the per-micro-step metrics (Trainer.micro_step), in the order they are read back from the device
METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "alpha_m", "kept", "beta_mean", "beta_min",
           "beta_max", "running_mean")


class Trainer:
    """``Trainer(cfg).train()``; ``model``/``processor`` objects may replace ``cfg.model`` (a PEFT model passed in
    keeps its adapters: its base with the adapters off is the reference)."""

    def __init__(self, cfg: TrainConfig, *, model=None, processor=None, ranker=None):
        cfg.validate()
        self.cfg = cfg
        self.device = device = train_device(cfg)
        check_quantization(cfg, device)
        self.ds_config = deepspeed_config(cfg)
        self.zero3 = zero_stage(self.ds_config) == 3
        if cfg.quantize and self.zero3:
            raise ValueError("quantize: ZeRO-3 cannot partition a quantized base; use ZeRO 0-2 with QLoRA")
        self.rank, self.world = init_distributed(device)
        model, processor = self._model(model, processor)
        dtype = training_dtype(self.ds_config, model)
        self.autocast = autocast_dtype(self.ds_config)
        self.sft = cfg.loss == "sft"
        self.reference, self.replays = None, []
        if cfg.reference == "model" and not self.lora and not self.sft:
            self.reference, self.replays = frozen_reference(model, dtype, self.autocast, share_vision=not self.zero3)
        self.frozen_vision = frozen_modules(model, "vision")
        self.encoder = PromptEncoder(processor, template=cfg.prompt_template, images=cfg.images, device=device,
                                     dtype=dtype)
        self.records, self.held_out, self.skipped = self._load_records()
        self.loss_fn = loss_module(cfg).to(device)
        self.engine, self.group_names = self._engine(model)
        if self.reference is not None and self.zero3:
            self.reference = self._sharded_reference(self.reference)
        self.train_mode()
        self._online(ranker, device)
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if cfg.resume and (self.ckpt_dir / "latest").exists():
            self._load_checkpoint()

    # ------------------------------------------------------------------------------------- setup
    def _model(self, model, processor):
        cfg = self.cfg
        if model is None:
            if not cfg.model:
                raise ValueError("model: give a local Hugging Face model directory")
            model, processor = load_model(cfg.model, str(self.device), torch.float32,
                                          **quantization_kwargs(cfg, self.device))
        elif processor is None:
            raise ValueError("processor: give the model's processor (or tokenizer) with the model")
        model.train()
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.lora = cfg.lora is not None or hasattr(model, "peft_config")
        if cfg.lora is not None:
            if hasattr(model, "peft_config"):
                raise ValueError("lora: the model passed is a PEFT model already; leave lora unset to train its "
                                 "adapters, or pass the plain model")
            model = apply_lora(model, cfg)
        elif not self.lora:
            choose_trainable(model, cfg.train, cfg.freeze)
        return model, processor

    def _online(self, ranker, device) -> None:
        cfg = self.cfg
        if cfg.online_bdhs is not None and self.zero3:
            raise ValueError("online_bdhs: generation from a ZeRO-3-partitioned policy is not supported; use ZeRO 0-2")
        similarity = None  # one sentence model serves the BDHS gate and Mixed-DPO's default ranker
        if cfg.online_bdhs is not None or (cfg.mixed_p is not None and ranker is None):
            from ..bdhs import SentenceSimilarity

            similarity = SentenceSimilarity(cfg.similarity_model, device=str(device))
        self.ranker = ranker
        if cfg.mixed_p is not None and ranker is None:
            self.ranker = online.SimilarityRanker(similarity)
        self.online = None
        if cfg.online_bdhs is not None:
            from ..bdhs import BDHSConfig

            self.online = (BDHSConfig(**cfg.online_bdhs), similarity, loss_module(cfg).to(device))

    def _read(self, path: str, what: str) -> tuple[list, list]:
        records, skipped = [], []
        for rec in data.iter_records(path, layout=self.cfg.layout, columns=self.cfg.columns):
            (skipped if isinstance(rec, data.RecordError) else records).append(rec)
        if skipped and self.rank == 0:
            print(f"train: skipping {len(skipped)} unreadable records of {what}, first: {skipped[0]}", file=sys.stderr)
        return records, skipped

    def _load_records(self):
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("data: give a preference dataset")
        records, skipped = self._read(cfg.data, "data")
        held = []
        if cfg.eval_data:
            held, more = self._read(cfg.eval_data, "eval_data")
            skipped += more
        elif cfg.eval_fraction:
            records, held = hold_out(records, cfg.eval_fraction, cfg.seed)
        if cfg.reference == "precomputed" and cfg.loss != "sft":
            lacking = next((r for r in records + held if r.extra.get("ref_chosen_logp") is None
                            or r.extra.get("ref_rejected_logp") is None), None)
            if lacking is not None:
                raise ValueError(f"reference='precomputed' but {lacking.where()} has no ref_chosen_logp/"
                                 "ref_rejected_logp: run `mmalign train --precompute-reference` first (on the held-"
                                 "out pairs too), or use reference='model'")
            from .reference import check_reference_config

            check_reference_config(records + held, cfg, training_dtype(self.ds_config), self.autocast)
        if len(records) < cfg.micro_batch_size * self.world:
            raise ValueError(f"data: {len(records)} usable pairs, fewer than one global micro-batch "
                             f"({cfg.micro_batch_size} x {self.world} ranks)")
        return records, (HeldOut(held, cfg.group_column, cfg.eval_batch_size) if held else None), skipped

    def _engine(self, model):
        import deepspeed

        groups = param_groups(model, self.cfg)
        opt = optimizer(groups, cpu_adam=offloads(self.ds_config) and self.device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(self.cfg, self.total_steps))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=scheduler,
                                               config=self.ds_config)
        if self.world == 1 and not self.ds_config.get("zero_optimization", {}).get("stage", 0):
            # one process, no ZeRO: DeepSpeed's all-reduce of the gradients would only copy all of them into a
            # flat buffer and back (4 bytes per fp32 parameter at the peak)
            engine.enable_backward_allreduce = False
        return engine, [g["name"] for g in groups]

    def _sharded_reference(self, reference):
        """Under ZeRO-3 the frozen reference is partitioned too (an inference-only DeepSpeed engine), so no rank
        holds a full copy; its parameters are gathered module by module as it runs."""
        import deepspeed

        ds = {k: v for k, v in self.ds_config.items() if k in ("train_micro_batch_size_per_gpu", "bf16", "fp16",
                                                                  "gradient_accumulation_steps", "torch_autocast")}
        ds["zero_optimization"] = {"stage": 3}
        engine, _, _, _ = deepspeed.initialize(model=reference, config=ds)
        return engine.module.eval()

    # ------------------------------------------------------------------------------------ modes
    @property
    def policy(self):
        return self.engine.module

    def train_mode(self) -> None:
        """The policy in training mode, its frozen vision modules in eval mode (no dropout: they compute what the
        reference's would)."""
        self.policy.train()
        for m in self.frozen_vision:
            m.eval()

    @contextlib.contextmanager
    def evaluating(self):
        """The policy and the loss module in eval mode (DAMO's running mean read, not updated)."""
        self.policy.eval()
        self.loss_fn.eval()
        try:
            yield
        finally:
            self.loss_fn.train()
            self.train_mode()

    # ------------------------------------------------------------------------------------ data
    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.records) // (self.cfg.micro_batch_size * self.world)

    @property
    def total_steps(self) -> int:
        steps = self.cfg.epochs * (self.micro_batches_per_epoch // self.cfg.grad_accum)
        return min(steps, self.cfg.max_steps) if self.cfg.max_steps else steps

    def encode(self, rec: data.PairRecord) -> PairExample:
        return encode_pair(rec, self.encoder, self.cfg.max_length)

    def micro_batch(self, k: int) -> list[PairExample]:
        """The k-th micro-batch of this rank: a function of (seed, epoch, k) only."""
        per_epoch, n = self.micro_batches_per_epoch, self.cfg.micro_batch_size
        epoch, j = divmod(k, per_epoch)
        order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        start = (j * self.world + self.rank) * n
        return [self.encode(self.records[i]) for i in order[start:start + n].tolist()]

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
        if self.cfg.reference == "precomputed":
            ref = torch.tensor([[e.ref_chosen for e in batch], [e.ref_rejected for e in batch]], dtype=torch.float32)
            return to_device(ref, self.device).unbind(0)
        with torch.no_grad():
            if self.lora:  # the base with the adapters off (and modules_to_save's originals)
                with reference_adapter(self.policy):
                    return pair_logps(self.policy, batch, zero3=self.zero3)
            with contextlib.ExitStack() as stack:
                for replay in self.replays:  # the policy's frozen vision tower ran already: its output again
                    stack.enter_context(replay.replaying())
                return pair_logps(self.reference, batch, zero3=self.zero3)

    def _logps(self, batch: list[PairExample]):
        """(policy chosen, policy rejected, reference chosen, reference rejected) sequence log-probs, float32."""
        with forward_precision(self.device, self.autocast):
            with contextlib.ExitStack() as stack:
                for replay in self.replays:
                    stack.enter_context(replay.record())
                pc, pr = pair_logps(self.policy, batch, zero3=self.zero3)
            rc, rr = self._reference_logps(batch)
        return pc.float(), pr.float(), rc.float(), rr.float()

    @torch.no_grad()
    def reward_margins(self, examples: list[PairExample]) -> torch.Tensor:
        """β·(logr_w - logr_l) per pair under the current policy (the implicit reward margin)."""
        pc, pr, rc, rr = self._logps(examples)
        return self.cfg.beta * ((pc - rc) - (pr - rr))

    def _loss(self, loss_fn, batch: list[PairExample], group=None):
        logps = self._logps(batch)
        alpha_d = None
        if all(e.alpha_d is not None for e in batch):
            alpha_d = to_device(torch.tensor([e.alpha_d for e in batch], dtype=torch.float32), self.device)
        return loss_fn(*logps, alpha_d=alpha_d, group=group)

    def loss_metrics(self, batch: list[PairExample]):
        """The loss module's output (per-pair losses, rewards, margins, accuracies) for ``batch`` on this rank alone
        (held-out scoring)."""
        return self._loss(self.loss_fn, batch)

    def _online_rejected(self, batch: list[PairExample], k: int) -> list[PairExample]:
        return online.online_rejected(self, batch, k)

    def _mixed(self, batch: list[PairExample], k: int) -> list[PairExample]:
        return online.mixed(self, batch, k)

    def _sft_step(self, batch: list[PairExample]) -> dict:
        """Supervised fine-tuning: the token-mean negative log-likelihood of the chosen responses (over the global
        micro-batch's tokens), the rejected ones unused."""
        batch = [dataclasses.replace(e, rejected_ids=[]) for e in batch]
        with forward_precision(self.device, self.autocast):
            logps, _ = pair_logps(self.policy, batch, zero3=self.zero3)
        tokens = torch.tensor(float(sum(len(e.chosen_ids) for e in batch)), device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(tokens)
        loss = -logps.float().sum() / tokens.clamp_min(1)
        self.engine.backward(loss * self.world)  # DeepSpeed averages gradients over ranks: scale back
        total = loss.detach().clone()
        if self.world > 1:
            torch.distributed.all_reduce(total)
        return {"loss": float(total)}

    def micro_step(self, batch: list[PairExample], k: int = 0) -> dict:
        if self.sft:
            return self._sft_step(batch)
        if self.cfg.mixed_p is not None:
            batch = self._mixed(batch, k)
        group = torch.distributed.group.WORLD if self.world > 1 else None
        out = self._loss(self.loss_fn, batch, group)
        loss = out.loss
        if self.online is not None:  # Eq. 5: γ·L(y+, y-) + (1-γ)·L(y+, ỹ-)
            online_out = self._loss(self.online[2], self._online_rejected(batch, k), group)
            loss = self.cfg.averaged_gamma * loss + (1 - self.cfg.averaged_gamma) * online_out.loss
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

    def _grad_norm(self) -> float | None:
        """The gradient norm before clipping, at an accumulation boundary: DeepSpeed's where its optimizer computes
        it (ZeRO, bf16), else from the gradients themselves (ZeRO-0 in fp32 or autocast)."""
        grads = [p.grad.detach() for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def train(self, callback=None) -> list[dict]:
        """Run to ``total_steps`` (from the checkpoint when resuming); returns this run's metric rows.
        ``callback(trainer, row)`` runs after every optimizer step (evaluation, early stopping: return True)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out, tensorboard=cfg.tensorboard, resume_step=self.step) if self.rank == 0 else None
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train",
                   disable=not cfg.progress or self.rank != 0, file=sys.stderr, dynamic_ncols=True)
        started = time.time()
        batches = self.micro_batches(self.step * cfg.grad_accum, self.total_steps * cfg.grad_accum)
        try:
            rows = self._train_loop(batches, bar, log, callback)
            if self.held_out is not None and not (cfg.eval_every and self.step % cfg.eval_every == 0 and rows):
                self.evaluate(log)
        finally:
            batches.close()  # an early stop (callback) or an error: the encoding thread finishes and exits
            bar.close()
            if log is not None:
                log.close()
        if cfg.save_final:
            if not rows or not (cfg.save_every and self.step % cfg.save_every == 0):
                self.save_checkpoint()
            self.export()
        if self.rank == 0 and rows:
            print(f"train: {len(rows)} steps in {time.time() - started:.1f} s, last loss {rows[-1]['loss']:.4f}",
                  file=sys.stderr)
        return rows

    def evaluate(self, log: MetricsLog | None = None) -> dict:
        """Score the held-out pairs now; the row is logged (rank 0) and returned."""
        row = {"step": self.step, **self.held_out.score(self)}
        if log is not None:
            log.write(row)
        return row

    def _train_loop(self, batches, bar, log, callback) -> list[dict]:
        """Optimizer steps until total_steps or until ``callback`` says stop; the metric rows."""
        cfg, rows = self.cfg, []
        while self.step < self.total_steps:
            t0, micro, norm = time.time(), [], None
            lrs = self.engine.get_lr()  # the rates of this step (the scheduler moves on at its end)
            for _ in range(cfg.grad_accum):
                k, batch = next(batches)
                micro.append(self.micro_step(batch, k))
                if self.engine.is_gradient_accumulation_boundary():
                    norm = self._grad_norm()
                self.engine.step()
            self.step += 1
            ds_norm = self.engine.get_global_grad_norm()
            row = {"step": self.step, "split": "train", **{k: sum(m[k] for m in micro) / len(micro) for k in micro[0]},
                   "grad_norm": float(ds_norm) if ds_norm is not None else norm,
                   "pairs_per_s": cfg.grad_accum * cfg.micro_batch_size * self.world / (time.time() - t0)}
            row["lr"] = lrs[-1]  # the rest group (the only one without param_groups)
            row.update({f"lr/{name}": lr for name, lr in zip(self.group_names[:-1], lrs[:-1])})
            if not self.sft:
                row["kept"], row["running_mean"] = micro[-1]["kept"], micro[-1]["running_mean"]
            rows.append(row)
            if log is not None and self.step % cfg.log_every == 0:
                log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            if self.held_out is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                self.evaluate(log)
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
            if callback is not None and callback(self, row):
                break
        return rows

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        state = {"step": self.step, "loss_fn": self.loss_fn.state_dict(),
                 "loss_online": self.online[2].state_dict() if self.online else None,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step{self.step}", client_state=state)
        if self.lora:
            save_adapter(self.policy, self.out / "adapter", self.zero3)

    def export(self) -> Path:
        """The trained model as Hugging Face loads it, with its processor: ``OUTPUT/model`` (under ZeRO-3 gathered
        from the ranks), or with LoRA the adapters in ``OUTPUT/adapter`` (``mmalign merge-lora`` merges them).
        ``mmalign eval`` reads either from the output directory."""
        if self.lora:
            save_adapter(self.policy, self.out / "adapter", self.zero3)
            where = self.out / "adapter"
        else:
            state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero3 else None
            where = self.out / "model"
            if self.rank == 0:
                self.policy.save_pretrained(str(where), state_dict=state)
        if self.rank == 0:
            self.encoder.processor.save_pretrained(str(where))
        return where

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
