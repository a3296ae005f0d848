"""DAMO's data-aware hardness (docs/math.md §4): sub-sentences, CLIP scores, P, δ and α_D per pair.

    from mmalign import hardness
    summary = hardness.run("pairs.jsonl", "pairs.hardness.jsonl", images="images/",
                           clip_model="ViT-L-14-336", clip_pretrained="openai")

The same job runs from the shell as ``mmalign hardness INPUT --images DIR --out OUTPUT``. Pieces:
:mod:`.split` (rules and LLM splitters), :mod:`.clip` (open_clip / Hugging Face scorers),
:mod:`.scores` (Eq. 5-7, reference and vectorized), :mod:`.job` (the resumable, sharded job).
"""
from .clip import ClipScorer, HFClipScorer, OpenClipScorer, load_scorer  # noqa: F401
from .job import HardnessConfig, Summary, merge, run  # noqa: F401
from .scores import alpha_d, pair_softmax  # noqa: F401
from .split import LLMSplitter, RulesSplitter, split_rules  # noqa: F401
