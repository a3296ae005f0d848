"""Bias-Driven Hallucination Sampling (docs/math.md §7): rejected responses from the model itself with most
image tokens hidden. :class:`BDHSEngine` generates them (batched, exact, deterministic per seed);
``mmalign bdhs`` runs it as a resumable, sharded job over a dataset (:mod:`.job`)."""
from .engine import MODES, BDHSConfig, BDHSEngine, BDHSResult, PairInput, SentenceSimilarity  # noqa: F401
from .noise import add_noise, alpha_bar  # noqa: F401
