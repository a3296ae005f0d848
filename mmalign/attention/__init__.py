"""Attention for BDHS (docs/math.md §7): causal attention that hides image keys (:func:`masked_attention`),
the exact compaction that removes hidden tokens instead (:func:`compact_image_tokens`), the mask of
Eq. 6 (:func:`sample_image_keep`), and the Hugging Face attention implementation ``"mmalign_masked"``
(:mod:`mmalign.attention.hf`)."""
from .compaction import Compacted, compact_image_tokens, sample_image_keep  # noqa: F401
from .masked import masked_attention, masked_attention_reference, visibility_mask  # noqa: F401
