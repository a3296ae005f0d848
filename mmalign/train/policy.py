"""The policy and its reference (docs/math.md §11's recipes).

What trains: roles (``llm``: the decoder and the LM head; ``projector``; ``vision``: the image encoder, found by
:meth:`mmalign.models.ModelAdapter.roles`) and parameter-name patterns. The default follows LLaVA and DAMO: the LLM
and the projector train, the vision tower is frozen. A frozen parameter has ``requires_grad=False``: no gradient,
no optimizer state.

LoRA (the alignment study's recipe; the default DPO path of LLaMA-Factory and TRL): peft adapters on the linear
layers of the LLM (or of the roles / module-name patterns of ``lora.target``); the other trained roles (the
projector) train in full through peft's ``modules_to_save``. A 4- or 8-bit base under the adapters (QLoRA) loads
through bitsandbytes on a CUDA GPU.

The reference of a live-reference run: with LoRA, the base with the adapters off (no second copy of the weights);
otherwise a frozen copy of the initial policy, cast as training casts the policy, whose frozen vision tower is the
policy's own (not a copy): within a step the tower runs once, its output replayed for the reference
(:class:`Replay`)."""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import sys
from pathlib import Path

import torch

from ..models import adapter_for, base_model
from .config import ROLES, TrainConfig
from .runtime import cast_like_training

DEFAULT_ROLES = ("llm", "projector")


def role_of(name: str, roles: dict[str, list[str]]) -> str | None:
    """The role of parameter ``name``: its longest module prefix among the roles' modules."""
    best, role = -1, None
    for r, prefixes in roles.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, role = len(prefix), r
    return role


def _matches(name: str, role: str | None, items) -> bool:
    return any(item == role if item in ROLES else fnmatch.fnmatchcase(name, item) for item in items)


def _selection(train) -> list[str] | None:
    """None: everything; else roles and patterns."""
    if train == "all":
        return None
    return list(DEFAULT_ROLES) if train == "default" else list(train)


def choose_trainable(model, train="default", freeze=None) -> dict[str, tuple[int, int]]:
    """Set ``requires_grad`` on ``model``'s parameters: those of ``train`` (roles and patterns; "default": llm and
    projector; "all") and not matching ``freeze``. Returns {role: (trainable, frozen)} parameter counts; a role or
    pattern that selects nothing raises ValueError."""
    roles = adapter_for(model).roles()
    chosen, freeze = _selection(train), list(freeze or ())
    for item in (chosen or []) + freeze:
        if item not in ROLES and not any(fnmatch.fnmatchcase(n, item) for n, _ in model.named_parameters()):
            raise ValueError(f"train / freeze: {item!r} is no role {ROLES} and matches no parameter name")
    counts: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        role = role_of(name, roles)
        on = (chosen is None or _matches(name, role, chosen)) and not _matches(name, role, freeze)
        p.requires_grad_(on)
        count = counts.setdefault(role or "other", [0, 0])
        count[0 if on else 1] += p.numel()
    if not any(c[0] for c in counts.values()):
        raise ValueError(f"train={train!r}, freeze={freeze!r}: no parameter left to train")
    return {k: tuple(v) for k, v in counts.items()}


def frozen_modules(model, role: str) -> list[torch.nn.Module]:
    """The modules of ``role`` whose parameters are all frozen."""
    named = dict(base_model(model).named_modules())
    mods = [named[n] for n in adapter_for(model).roles()[role]]
    return [m for m in mods if not any(p.requires_grad for p in m.parameters())]


# ------------------------------------------------------------------------------------------------ LoRA
def lora_config(model, cfg: TrainConfig):
    """The peft LoraConfig of ``cfg.lora`` for ``model``: adapters on every linear layer of the target (roles or
    module-name patterns; default the LLM, the LM head excepted: the fused head reads its weight), the other roles
    of ``cfg.train`` trained in full (``modules_to_save``)."""
    import peft

    spec = dict(cfg.lora)
    adapter = adapter_for(model)
    roles = adapter.roles()
    target = spec.get("target", ["llm"])
    target = [target] if isinstance(target, str) else list(target)
    head = {n for n, m in model.named_modules() if m is adapter.head}
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in head
              and _matches(n, role_of(n, roles), target)]
    if not linear:
        raise ValueError(f"lora.target: {target!r} selects no linear layer (roles {ROLES} or module-name patterns)")
    chosen = _selection(cfg.train)
    if chosen is None:
        raise ValueError("lora: train='all' would train every weight in full beside the adapters; name the roles "
                         "that train in full (e.g. train=['llm', 'projector'])")
    full = [r for r in chosen if r in ROLES and r not in target]
    save = [n for r in full for n in roles[r] if n not in head]
    if any(item not in ROLES for item in chosen):
        raise ValueError(f"lora: train={chosen!r}: with LoRA, train names roles (what is not adapted trains in full)")
    alpha = spec.get("alpha", 2 * int(spec.get("r", 8)))
    return peft.LoraConfig(r=int(spec.get("r", 8)), lora_alpha=alpha, lora_dropout=float(spec.get("dropout", 0.0)),
                           target_modules=linear, modules_to_save=save or None, bias="none")


def apply_lora(model, cfg: TrainConfig):
    """``model`` wrapped by peft with :func:`lora_config` (seeded: the adapters' initialization is a function of
    ``cfg.seed``); ``freeze`` patterns then freeze what they match."""
    import peft

    if cfg.quantize:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    config = lora_config(model, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        wrapped = peft.get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if cfg.freeze and any(fnmatch.fnmatchcase(name, f) for f in cfg.freeze):
            p.requires_grad_(False)
    return wrapped


def check_quantization(cfg: TrainConfig, device: torch.device) -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU: a ValueError saying which is missing, before anything loads."""
    if cfg.quantize is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"quantize={cfg.quantize!r}: loading a quantized base needs the bitsandbytes package "
                         "(pip install bitsandbytes) and a CUDA GPU; train without quantize (LoRA on a bf16 base) "
                         "otherwise") from None
    if device.type != "cuda":
        raise ValueError(f"quantize={cfg.quantize!r}: bitsandbytes' quantized layers run on a CUDA GPU, and this "
                         f"run trains on {device}; train without quantize here")


def quantization_kwargs(cfg: TrainConfig, device: torch.device) -> dict:
    """``from_pretrained`` arguments that load the base in 4 or 8 bits (QLoRA), or nothing."""
    if cfg.quantize is None:
        return {}
    from transformers import BitsAndBytesConfig

    bits = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16) if cfg.quantize == "4bit" \
        else BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bits, "device_map": {"": device.index or 0}}


def save_adapter(model, out: Path, zero3: bool) -> None:
    """The LoRA adapters (and modules_to_save) in peft's format, loadable by ``PeftModel.from_pretrained``; under
    ZeRO-3 the partitioned adapter weights are gathered first. Every rank calls it; rank 0 writes."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = [p for p in model.parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gather:
        if rank == 0:
            model.save_pretrained(str(out))


def merge_adapter(adapter: str, out: str, base: str | None = None) -> str:
    """``mmalign merge-lora``: the base model with the adapters of ``adapter`` merged into its weights, saved with
    its processor to ``out`` as a plain Hugging Face model directory."""
    import peft

    from ..models import load_model

    base = base or peft.PeftConfig.from_pretrained(adapter).base_model_name_or_path
    if not base:
        raise ValueError(f"{adapter}: its adapter_config.json names no base model: pass --base")
    model, processor = load_model(base, "cpu", torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    print(f"merge-lora: {base} + {adapter} -> {out}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------- reference
class Replay:
    """A frozen module shared by the policy and the reference: within :meth:`record` its calls run and keep their
    outputs; within :meth:`replaying` calls with the same inputs (compared exactly) return those outputs in
    order instead of running again. Same weights, same inputs: the same features, computed once."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.kept, self.queue = module, None, None
        self.calls = 0  # the module's own forwards (for tests and benchmarks)
        self._forward = module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        if self.queue:
            (a, k), out = self.queue[0]
            if _same(a, args) and _same(k, kwargs):
                self.queue.pop(0)
                return out
        self.calls += 1
        out = self._forward(*args, **kwargs)
        if self.kept is not None:
            self.kept.append(((args, kwargs), out))
        return out

    @contextlib.contextmanager
    def record(self):
        self.kept = []
        try:
            yield
        finally:
            self.queue, self.kept = self.kept, None

    @contextlib.contextmanager
    def replaying(self):
        try:
            yield
        finally:
            self.queue = None


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def frozen_reference(model, dtype: torch.dtype, autocast: torch.dtype | None, *, share_vision: bool):
    """The live reference: a frozen copy of the initial policy, cast as training casts the policy (see
    :func:`cast_like_training`); with ``share_vision``, the policy's frozen vision modules are not copied but shared,
    each behind a :class:`Replay` (returned, one per shared module)."""
    shared = frozen_modules(model, "vision") if share_vision else []
    reference = copy.deepcopy(model, memo={id(m): m for m in shared})
    keep = {id(p) for m in shared for p in m.parameters()}
    for p in reference.parameters():
        p.requires_grad_(False)
    reference.eval()
    cast_like_training(reference, dtype, autocast, skip=keep)
    return reference, [Replay(m) for m in shared]
