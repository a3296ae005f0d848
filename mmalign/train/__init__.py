"""Thin DPO-family trainers on DeepSpeed (``mmalign train``): :class:`Trainer` with :class:`TrainConfig`, the
papers' recipes (frozen towers, LoRA, parameter groups, schedules: ``recipes/``), :func:`precompute_reference`, and
the batch pieces in :mod:`.batches` (vision once per pair, fused log-probs on the final hidden states)."""
from .batches import PairExample, encode_pair, pair_logps  # noqa: F401
from .config import LOSSES, TrainConfig, loss_module  # noqa: F401
from .reference import precompute_reference  # noqa: F401
from .runtime import deepspeed_config, enable_checkpointing  # noqa: F401
from .trainer import Trainer  # noqa: F401
