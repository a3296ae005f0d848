"""``TrainConfig``: everything ``mmalign train`` reads, checked up front (before a model loads), from flags or a
JSON / YAML file (``recipes/``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..nn import DAMOConfig, DAMOLoss

# loss name -> (DAMO preset, loss type); "sft": supervised fine-tuning on the chosen responses (a warm-up before
# alignment: the token-mean negative log-likelihood; no reference, the rejected responses unused)
LOSSES = {"dpo": ("dpo", "sigmoid"), "ipo": ("dpo", "ipo"), "hinge": ("dpo", "hinge"),
          "d2po": ("d2po", "sigmoid"), "mdpo": ("mdpo", "sigmoid"), "damo": ("damo", "sigmoid"),
          "sft": ("dpo", "sigmoid")}
SCHEDULERS = ("cosine", "linear", "constant")
ROLES = ("llm", "projector", "vision")
LORA_KEYS = {"r", "alpha", "dropout", "target"}


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------------------ model and data
    model: str | None = None            # local Hugging Face model directory
    data: str | None = None             # preference data (any input `mmalign hardness` reads)
    images: str | None = None
    output_dir: str = "runs/mmalign"
    prompt_template: str | None = None
    layout: str = "auto"
    columns: dict | None = None
    max_length: int = 2048
    # ---------------------------------------------------------------------------------- what trains
    train: str | list = "default"       # "default": the LLM and the projector, the vision tower frozen (the LLaVA /
                                        # DAMO recipe); "all"; or a list of roles (llm, projector, vision) and
                                        # parameter-name patterns (fnmatch: "model.language_model.layers.1*")
    freeze: list | None = None          # parameter-name patterns kept frozen whatever `train` says
    lora: dict | None = None            # LoRA adapters through peft: r, alpha, dropout, target (roles or module-name
                                        # patterns; default the LLM's linear layers); the other modules of `train`
                                        # (the projector) train in full beside them
    quantize: str | None = None         # "4bit" or "8bit": a quantized base under the LoRA adapters (QLoRA;
                                        # bitsandbytes on a CUDA GPU)
    # ------------------------------------------------------------------------------- optimization
    lr: float = 5e-7
    weight_decay: float = 0.0
    param_groups: list | None = None    # [{"params": "projector" (roles / patterns), "lr": 2e-5, "weight_decay": 0.0}]:
                                        # the rest take lr and weight_decay
    scheduler: str = "constant"         # after the warm-up: cosine or linear decay to 0 at the last step, or constant
    warmup_steps: int = 0
    warmup_ratio: float | None = None   # warm-up as a share of the optimizer steps (instead of warmup_steps)
    max_grad_norm: float | None = 1.0   # gradient clipping (None or 0: off)
    epochs: int = 1
    max_steps: int | None = None
    micro_batch_size: int = 4           # pairs per rank per micro-batch
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    # ------------------------------------------------------------------------------- DeepSpeed, precision
    deepspeed: str | dict | None = None  # a DeepSpeed JSON (path or dict), taken as is; "auto" values filled
    zero_stage: int = 0                 # used when no DeepSpeed config is given
    bf16: bool = False
    autocast: bool = False              # with bf16: fp32 weights, the forward under torch.autocast (DeepSpeed's
                                        # torch_autocast); default: DeepSpeed's bf16 mode (bf16 weights + fp32 master)
    device: str | None = None           # "cpu", "cuda" (= cuda:LOCAL_RANK) or "cuda:N"; None: the GPU when there is one
    offload_optimizer: bool = False
    # ------------------------------------------------------------------------------------- the loss
    loss: str = "dpo"
    beta: float = 0.1
    damo: dict = field(default_factory=dict)  # more DAMOConfig fields: variant, selection, keep, gamma, ...
    reference: str = "precomputed"      # "precomputed" (ref_*_logp in the data) or "model" (the initial policy: a
                                        # frozen copy, or with LoRA the base with the adapters off)
    online_bdhs: dict | None = None     # BDHSConfig fields: enables the averaged loss of docs/math.md §6 (Eq. 5)
    averaged_gamma: float = 0.5         # γ of Eq. 5: γ·L(y+, y-) + (1-γ)·L(y+, ỹ-)
    similarity_model: str = "sentence-transformers/all-mpnet-base-v2"  # online BDHS gate; Mixed-DPO's default ranker
    mixed_p: float | None = None        # Mixed-DPO (Eq. 4): keep the offline pair with probability p, else an online one
    mixed_max_new_tokens: int = 64      # length of the two responses sampled from the policy
    # -------------------------------------------------------------------------------- held-out metrics
    eval_data: str | None = None        # held-out pairs (same format as data)
    eval_fraction: float | None = None  # or this share of `data`, held out (a function of seed)
    eval_every: int | None = None       # optimizer steps between evaluations (and one at the end); None: only the end
    eval_batch_size: int = 8
    group_column: str | None = None     # a column of the data (the demo's "difficulty"): metrics also per value
    # ------------------------------------------------------------------------------------ the run
    seed: int = 0
    log_every: int = 1
    save_every: int | None = None       # optimizer steps
    save_final: bool = True             # a checkpoint at the end of train()
    resume: bool = True
    progress: bool = True
    tensorboard: bool = True            # also log to OUTPUT/tensorboard when the tensorboard package is installed
    prefetch: bool | None = None        # encode micro-batch k+1 in a background thread while k trains; None: on a GPU

    def validate(self) -> None:
        """Every option checked before anything loads: a ValueError naming the option."""
        from .. import devices

        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.reference not in ("precomputed", "model"):
            raise ValueError(f"reference: expected 'precomputed' or 'model', got {self.reference!r}")
        for name in ("micro_batch_size", "grad_accum", "epochs", "max_length", "log_every", "eval_batch_size"):
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
        devices.check_device(self.device)
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
        self._validate_training()
        self._validate_schedule()
        self._validate_eval()
        if self.loss == "sft":
            for name in ("online_bdhs", "mixed_p", "eval_data", "eval_fraction"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: not with loss='sft' (it trains on the chosen responses alone)")
            if self.damo:
                raise ValueError("damo: not with loss='sft'")

    def _validate_training(self) -> None:
        if not (self.train in ("default", "all") or (isinstance(self.train, (list, tuple)) and self.train
                                                      and all(isinstance(x, str) for x in self.train))):
            raise ValueError(f"train: expected 'default', 'all' or a list of roles {ROLES} and parameter-name "
                             f"patterns, got {self.train!r}")
        if self.freeze is not None and not (isinstance(self.freeze, (list, tuple))
                                            and all(isinstance(x, str) for x in self.freeze)):
            raise ValueError(f"freeze: expected a list of parameter-name patterns, got {self.freeze!r}")
        if self.lora is not None:
            if not isinstance(self.lora, dict) or set(self.lora) - LORA_KEYS:
                raise ValueError(f"lora: expected a mapping with keys among {sorted(LORA_KEYS)}, got {self.lora!r}")
            if not (isinstance(self.lora.get("r", 8), int) and self.lora.get("r", 8) >= 1):
                raise ValueError(f"lora.r: expected an int >= 1, got {self.lora.get('r')!r}")
            if not 0.0 <= float(self.lora.get("dropout", 0.0)) < 1.0:
                raise ValueError(f"lora.dropout: expected a value in [0, 1), got {self.lora.get('dropout')!r}")
        if self.quantize is not None:
            if self.quantize not in ("4bit", "8bit"):
                raise ValueError(f"quantize: expected '4bit' or '8bit', got {self.quantize!r}")
            if self.lora is None:
                raise ValueError("quantize: a quantized base trains through LoRA adapters only (QLoRA): set lora")
        if self.param_groups is not None:
            if not isinstance(self.param_groups, (list, tuple)):
                raise ValueError(f"param_groups: expected a list of groups, got {type(self.param_groups).__name__}")
            for i, group in enumerate(self.param_groups):
                if not isinstance(group, dict) or "params" not in group or set(group) - {"params", "lr",
                                                                                         "weight_decay"}:
                    raise ValueError(f"param_groups[{i}]: expected {{'params': roles or patterns, 'lr': ..., "
                                     f"'weight_decay': ...}}, got {group!r}")
                if "lr" in group and not float(group["lr"]) > 0:
                    raise ValueError(f"param_groups[{i}].lr: expected > 0, got {group['lr']!r}")

    def _validate_schedule(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ValueError(f"warmup_ratio: expected a value in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise ValueError("warmup_ratio and warmup_steps: give one of them")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm: expected >= 0 or None, got {self.max_grad_norm}")

    def _validate_eval(self) -> None:
        if self.eval_data is not None and self.eval_fraction is not None:
            raise ValueError("eval_data and eval_fraction: give one of them")
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: expected a value in (0, 1), got {self.eval_fraction}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"eval_every: expected >= 1, got {self.eval_every}")
        if self.eval_every is not None and self.eval_data is None and self.eval_fraction is None:
            raise ValueError("eval_every: give the held-out pairs (eval_data or eval_fraction)")

    @classmethod
    def from_file(cls, path: str, **overrides) -> "TrainConfig":
        """A JSON or YAML file whose keys are the fields of this class; ``overrides`` (not None) replace them."""
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
