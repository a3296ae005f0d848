"""mmalign: fused kernels and pipelines for aligning multimodal LLMs with DPO-family losses.

Importing mmalign touches no GPU. ``mmalign.functional`` holds the ops (with their configuration and output
types), ``mmalign.nn`` their modules, ``torch.ops.mmalign`` the operators behind every backend, ``python -m mmalign
env`` tells which backends run on this machine. CHANGELOG.md maps the 0.1 calls to their 0.2 forms."""
from . import functional, nn  # noqa: F401
from ._dispatch import BackendUnavailable  # noqa: F401

__version__ = "0.2.0"
