"""mmalign: fused kernels and pipelines for aligning multimodal LLMs with DPO-family losses.

Importing mmalign touches no GPU. ``mmalign.functional`` holds the ops, ``mmalign.nn`` their modules,
``python -m mmalign env`` tells which backends run on this machine."""
from . import functional, nn  # noqa: F401
from ._dispatch import BackendUnavailable  # noqa: F401

__version__ = "0.1.0"
