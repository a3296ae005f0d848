"""How ``mmalign train`` runs: the DeepSpeed config (from the user's JSON or built from the options), the
precision policy (DeepSpeed's bf16 mode, or fp32 weights under torch.autocast), gradient checkpointing, the device
and the process group. Shared by the trainer and the reference pass."""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch

from .. import devices
from .config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The user's DeepSpeed config as is (``"auto"`` values filled from ``cfg``), or one built from ``cfg``."""
    if cfg.deepspeed is None:
        ds = {"zero_optimization": {"stage": cfg.zero_stage}, "bf16": {"enabled": cfg.bf16 and not cfg.autocast}}
        if cfg.autocast:
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if cfg.offload_optimizer:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    else:
        ds = copy.deepcopy(cfg.deepspeed) if isinstance(cfg.deepspeed, dict) else json.loads(Path(cfg.deepspeed).read_text())
    fill = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.max_grad_norm or 0.0}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = cfg.bf16
    ds.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is torch's AdamW ...
    if offloads(ds) and train_device(cfg).type != "cuda":
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


def cast_like_training(model: torch.nn.Module, dtype: torch.dtype, autocast: torch.dtype | None = None, *,
                       skip: set = frozenset()):
    """Cast ``model``'s parameters in place as training computes with the policy's, so that the reference gives
    the policy's log-probs at step 0: all to ``dtype`` (DeepSpeed's bf16 mode casts the policy so; buffers such as
    rotary frequencies keep theirs), or under autocast only the weights autocast runs in ``autocast``
    (linear and convolution layers), the rest kept in fp32 like the policy's. Parameters whose id is in ``skip``
    (modules shared with the policy) are left as they are."""
    for module in model.modules():
        target = dtype if autocast is None else (autocast if isinstance(module, AUTOCAST_MODULES) else None)
        for p in module.parameters(recurse=False):
            if target is not None and p.is_floating_point() and id(p) not in skip:
                p.data = p.data.to(target)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face gradient checkpointing: each decoder layer keeps its input only and runs its forward again in
    the backward (one more forward of the policy per step; activations fall from all of each layer's to its
    input's). transformers >= 5.2x names it activation_checkpointing_enable (the old name warns)."""
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def forward_precision(device: torch.device, autocast: torch.dtype | None):
    """The context the policy and reference forwards run in: torch.autocast in autocast mode, else none."""
    return torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()


def offloads(ds: dict) -> bool:
    device = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return device not in (None, "none")


def train_device(cfg: TrainConfig) -> torch.device:
    """cfg.device ("cuda" alone means this process's GPU, cuda:LOCAL_RANK), else the GPU when there is one."""
    return torch.device(devices.default_device(cfg.device))


def use_accelerator(device: torch.device) -> None:
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


def init_distributed(device: torch.device):
    """The process group: as a launcher (torchrun, deepspeed) set it up, else a group of one over an in-memory
    store, which binds no port (two single-process jobs on one machine, or a port picked free and taken by
    another process before it is bound, cannot collide). NCCL for GPUs, gloo on CPU."""
    import deepspeed

    use_accelerator(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    launched = "MASTER_PORT" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1"
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    if not launched and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=launched)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
