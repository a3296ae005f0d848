"""Hallucination evaluation (docs/math.md §10): POPE, CHAIR with Recall^coco, AMBER.

:mod:`mmalign.eval.metrics` holds the metrics and their formulas (pure Python, no model),
:mod:`mmalign.eval.formats` the readers of the public POPE / COCO / AMBER files, :mod:`mmalign.eval.coco` CHAIR's
COCO vocabulary, and :mod:`mmalign.eval.job` ``mmalign eval``: answers from one or several models, per-question
rows, a summary table and plot."""
from .formats import (coco_vocabulary, read_coco_images, AmberAnnotation, AmberQuery, FormatError, PopeQuestion, read_amber_annotations,
                      read_amber_association, read_amber_queries, read_amber_responses, read_amber_safe_words,
                      read_coco_ground_truth, read_pope_answers, read_pope_questions)
from .metrics import (AMBER_TYPES, POPE_SETTINGS, AmberVocabulary, ChairVocabulary, Mention,
                      amber_discriminative_scores, amber_generative_scores, chair_scores, grouped_pope_scores,
                      macro_average, parse_yes_no, plural_forms, pope_scores, pope_scores_by_setting,
                      singular_map, tokenize)

__all__ = [
    "coco_vocabulary", "read_coco_images",
    "AMBER_TYPES", "POPE_SETTINGS", "AmberAnnotation", "AmberQuery", "AmberVocabulary", "ChairVocabulary",
    "FormatError", "Mention", "PopeQuestion", "amber_discriminative_scores", "amber_generative_scores",
    "chair_scores", "grouped_pope_scores", "macro_average", "parse_yes_no", "plural_forms", "pope_scores",
    "pope_scores_by_setting", "read_amber_annotations", "read_amber_association", "read_amber_queries",
    "read_amber_responses", "read_amber_safe_words", "read_coco_ground_truth", "read_pope_answers",
    "read_pope_questions", "singular_map", "tokenize",
]
