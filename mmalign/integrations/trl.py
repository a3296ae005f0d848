"""mmalign inside TRL: :class:`DAMODPOTrainer` is TRL's ``DPOTrainer`` whose loss is
:class:`mmalign.nn.DAMOLoss` (presets dpo, d2po, mdpo, damo; loss types sigmoid, ipo, hinge; the
official and paper variants) and whose log-probs come from mmalign's fused op
(:func:`mmalign.integrations.hf.patch_sequence_logps`). Everything else (data processing, the
Trainer loop, accelerate/DeepSpeed, logging) is TRL's.

    trainer = DAMODPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=ds,
                             processing_class=tokenizer, damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("damo")))
    trainer.train()

Notes: α_D is not used here (TRL's collator drops extra columns; use ``mmalign train`` for d2po/damo with
data hardness); the loss is ``damo_loss``: TRL's own loss options (``loss_type``, ``label_smoothing``, ``beta``,
``f_divergence_type``, ``ld_alpha``, ``loss_weights``, ``use_weighting``) raise unless they agree with it; the
reference comes from ``ref_model``, ``precompute_ref_log_probs=True``, or, for a PEFT model without
``ref_model``, as in TRL: the base model with the adapters off (a new adapter), or the adapter named "ref"
when there is one (re-training an existing adapter).
Written against TRL 1.x, whose ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` this overrides.
"""
from __future__ import annotations

import dataclasses

import torch

from ..nn import DAMOLoss
from ..models import reference_adapter
from .hf import patch_sequence_logps

try:
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - the integration is optional
    raise ImportError("mmalign.integrations.trl needs TRL: pip install trl") from e

_NOT_MODEL = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class DAMODPOTrainer(DPOTrainer):
    def __init__(self, *args, damo_loss: DAMOLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.damo_loss = (damo_loss or DAMOLoss(self.beta)).to(self.accelerator.device)
        refuse_unread_options(self.args, self.damo_loss)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        patch_sequence_logps(base)  # on top of TRL's fused head: ours answers fused_lm_head=True
        if self.ref_model is not None:
            patch_sequence_logps(self.ref_model)

    def _sequence_logps(self, model, inputs):
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL}
        kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        # Under mixed precision, accelerate wraps a model's forward in autocast. The reference was wrapped
        # before patch_sequence_logps replaced its forward, so its fused path would run outside that
        # wrapper (fp32 while the policy runs in bf16: nonzero log-ratios for identical weights). Run both
        # under the accelerator's autocast.
        with self.accelerator.autocast():
            return model(**kwargs, labels=labels, fused_lm_head=True).logps.chunk(2)  # batch is [chosen; rejected]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen, rejected = self._sequence_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.ref_model is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = self._sequence_logps(self.ref_model, inputs)
        elif hasattr(unwrapped := self.accelerator.unwrap_model(self.model), "disable_adapter"):  # PEFT
            with torch.no_grad(), reference_adapter(unwrapped):
                ref_chosen, ref_rejected = self._sequence_logps(model, inputs)
        else:
            raise ValueError("DAMODPOTrainer needs a reference: pass ref_model, precompute_ref_log_probs=True, or a "
                             "PEFT model (its base model is the reference)")
        self.damo_loss.train(mode == "train")  # eval batches use the running mean without updating it
        world = self.accelerator.num_processes
        # the statistics of the step are those of the global batch: every rank's pairs (docs/math.md §3); the group is
        # named, never implied by an initialized torch.distributed
        group = torch.distributed.group.WORLD if world > 1 else None
        out = self.damo_loss(chosen.float(), rejected.float(), ref_chosen.float(), ref_rejected.float(), group=group)
        loss = out.loss * world  # each rank holds its share of the global loss; gradients are averaged over ranks
        m, gather = out, self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(m.chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(m.rejected_rewards).mean().item())
        metrics["rewards/margins"].append(gather(m.margins).mean().item())
        metrics["rewards/accuracies"].append(gather(m.accuracies.float()).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        metrics["damo/alpha_m"].append(float(m.alpha_m))
        metrics["damo/kept"].append(int(m.keep.sum()))
        metrics["damo/beta_mean"].append(m.beta.mean().item())
        metrics["damo/running_mean"].append(float(self.damo_loss.running_mean))
        return (loss, out) if return_outputs else loss


def refuse_unread_options(args, damo_loss: DAMOLoss) -> None:
    """DPOConfig's loss options that this trainer does not read (its loss is ``damo_loss``) raise ValueError
    pointing at DAMOLoss, unless they agree with it: never a loss other than the one asked for, silently."""
    cfg, default = damo_loss.config, _defaults(args)  # a DPOConfig default is not a choice
    loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if loss_types not in (default["loss_type"], [cfg.loss_type]):
        raise ValueError(f"loss_type: DAMODPOTrainer's loss is damo_loss (loss_type={cfg.loss_type!r}), not "
                         f"DPOConfig's {loss_types}: pass DAMOLoss(loss_type=...)")
    if args.label_smoothing not in (default["label_smoothing"], cfg.label_smoothing):
        raise ValueError(f"label_smoothing: DAMODPOTrainer's loss is damo_loss (label_smoothing={cfg.label_smoothing}):"
                         " pass DAMOLoss(label_smoothing=...)")
    if args.beta not in (default["beta"], damo_loss.beta):
        raise ValueError(f"beta: DPOConfig has beta={args.beta} and damo_loss beta={damo_loss.beta}: the loss uses "
                         "damo_loss's; make them agree")
    for name in ("f_divergence_type", "ld_alpha", "loss_weights", "use_weighting"):  # not in damo_loss
        if name in default and getattr(args, name) != default[name]:
            raise ValueError(f"{name}: DAMODPOTrainer's loss (damo_loss) does not implement it; "
                             f"leave it at {default[name]!r}")


def _defaults(args) -> dict:
    """The default of every field of ``args`` (a DPOConfig dataclass)."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(args) if f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING}
