"""Local hallucination metrics (docs/math.md §10): POPE, CHAIR with Recall^coco, AMBER. Pure Python, no model.

Every ratio below is computed from integer counts with one correctly rounded division, so a test can compare
it with ``==`` to the same fraction written by hand. A ratio whose denominator is 0 inside a non-empty
evaluation is 0.0 (for example precision when nothing was predicted positive); an evaluation with no sample
at all raises ``ValueError``.

POPE (Li et al., 2023), following its release's ``evaluate.py``
-----------------------------------------------------------------
:func:`parse_yes_no` reads an answer as the release does: keep the text before the first ``.``, delete
commas, split on the space character (not on other whitespace); the answer is "no" when one of the pieces
is exactly ``No``, ``not`` or ``no`` (case-sensitive), otherwise "yes". Consequences, kept on purpose so
numbers match the release: "" (an empty answer), "I don't know", "NO", "Not really", "Nope", "No!" and
"No\\n..." all read as "yes"; "There is not a dog" and "no, but ..." read as "no".

:func:`pope_scores`, with one class called positive (POPE: "yes"), counts tp (positive label, positive
answer), fp (negative label, positive answer), tn, fn over the n answers and reports

    accuracy  = (tp + tn) / n
    precision = tp / (tp + fp)              (0.0 when nothing was answered positive)
    recall    = tp / (tp + fn)              (0.0 when no label is positive)
    f1        = 2 tp / (2 tp + fp + fn)     (= 2 P R / (P + R); 0.0 when tp = 0)
    yes_ratio = answers read as "yes" / n   (whatever the positive class)

POPE reports them per negative-sampling setting (:func:`pope_scores_by_setting`); :func:`macro_average`
averages settings with equal weight.

CHAIR (Rohrbach et al., 2018) and Recall^coco, following the release's ``utils/chair.py``
----------------------------------------------------------------------------------------
:class:`ChairVocabulary` finds the COCO categories a text mentions: lower-case the text; split it into
words (runs of letters and digits, a hyphen inside a word keeps it whole as nltk's tokenizer does, an
apostrophe splits); turn plurals of vocabulary words into the singular (:func:`singular_map`, which replaces
the release's ``pattern.en.singularize``); read the pairs of :data:`~mmalign.eval.coco.COCO_PHRASES` as one
word, left to right, longest first ("hot dog" is the category hot dog and never a dog, "teddy bear" never a
bear, "baby bird" a bird and not a person, "toilet seat" a toilet and not a chair); if the text has the word
"toilet" anywhere, every "seat" is dropped too; then every remaining word that is a synonym of a category
is a mention of that category ("man", "people", "children" -> person).

:func:`chair_scores` takes texts with the set of categories present in each image (its ground truth: the
annotated categories together with those its reference captions mention, see
:func:`mmalign.eval.formats.read_coco_ground_truth`). Per text, each mentioned category counts once
(docs/math.md §10; ``unique=False`` counts every occurrence, as the release does); a mention is hallucinated
when its category is not in the ground truth. Pooled over the n texts:

    CHAIR_i     = hallucinated mentions / all mentions
    CHAIR_s     = texts with at least one hallucinated mention / n
    Recall^coco = ground-truth categories the text mentions / ground-truth categories   (summed over texts)
    mean_length = words / n, a word being a run of non-whitespace characters (``str.split()``)

The study (App. B.2) warns that CHAIR alone rewards short answers: the result always carries recall and
mean_length next to CHAIR.

AMBER (Wang et al., 2023), following its release's ``inference.py``
-------------------------------------------------------------------
Discriminative questions (:func:`amber_discriminative_scores`) are read with :func:`parse_yes_no` and scored
with :func:`pope_scores` per dimension: existence (annotation type ``discriminative-hallucination``),
attribute (state + number + action, also reported separately), relation (``discriminative-relation`` and
``relation``), and all together. AMBER's script takes **"no" as the positive class** (its precision is correct
"no" answers / "no" answers, its recall correct "no" answers / "no" labels), so that is the default here,
which makes F1 comparable with published AMBER numbers and is the only choice that gives existence a
meaningful F1 (all 4,924 existence questions of the release are labelled "no", so with "yes" positive their
recall and F1 are always 0); pass ``positive="yes"`` for POPE's convention. Two
differences from the script: an answer other than exactly "Yes"/"No" is parsed with the POPE rule instead of
always counting as wrong, and F1 is exact instead of computed from rounded percentages with an epsilon.

The generative part (:func:`amber_generative_scores`) uses AMBER's own files: the annotation of each image
(``truth``: objects present, ``hallu``: hallucination-prone objects absent from it), the association list
``relation.json`` (words that count for an object, e.g. person -> man, woman, people) and ``safe_words.txt``.
A response's object words are its words that are in AMBER's vocabulary (every key and value of
``relation.json``), singularised, one entry per occurrence. Each occurrence is then, in this order:

- a safe word: counted, never hallucinated, covers nothing;
- a word for a truth object (the object itself or one of its associated words): not hallucinated, and it
  covers the first truth object it matches, with the script's order (the associated words of all truth
  objects first, in annotation order, then the truth objects themselves);
- otherwise hallucinated, and if it is a word for a ``hallu`` object (same matching) it covers that object.

Pooled over the n generative responses (the script's definitions; it prints them times 100):

    CHAIR = hallucinated occurrences / object-word occurrences
    Cover = covered truth objects / truth objects      (an object listed twice in ``truth`` counts twice)
    Hal   = responses with at least one hallucinated occurrence / n
    Cog   = covered hallu objects / hallu objects

Simplifications, documented because they change numbers slightly: AMBER keeps only the words nltk tags as
nouns (here every vocabulary word counts, so "to watch" counts the object "watch"); AMBER lemmatises with
WordNet (here: :func:`plural_forms` of the vocabulary words, and lower-case matching, where AMBER's matching is
case-sensitive); and AMBER also accepts a word whose spaCy ``en_core_web_lg`` similarity to a truth or hallu
word exceeds 0.8, which needs word vectors and is not done here (exact words only). The script also starts
every denominator at 0.001 instead of 0; here the counts are exact (0.0 where a denominator is 0).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from .coco import COCO_PHRASES, COCO_SYNONYMS

__all__ = [
    "POPE_SETTINGS", "AMBER_TYPES", "parse_yes_no", "pope_scores", "grouped_pope_scores",
    "pope_scores_by_setting", "macro_average", "amber_discriminative_scores", "tokenize", "plural_forms",
    "singular_map", "Mention", "ChairVocabulary", "chair_scores", "AmberVocabulary", "amber_generative_scores",
]

POPE_SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")

# AMBER annotation type -> (dimension, sub-dimension or None)
AMBER_TYPES: dict[str, tuple[str, str | None]] = {
    "generative": ("generative", None),
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", None),
    "relation": ("relation", None),
}
_AMBER_GROUPS = ("discriminative", "existence", "attribute", "state", "number", "action", "relation")


def _ratio(num: int, den: int) -> float:
    """num / den as the correctly rounded float (int / int in Python is), 0.0 when den is 0."""
    return num / den if den else 0.0


def _get(obj: Any, name: str, default: Any = ...) -> Any:
    """A field of a record given either as a mapping (raw JSON) or as an object (a formats dataclass)."""
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is ...:
        raise ValueError(f"record {obj!r} has no field {name!r}")
    return default


# ---------------------------------------------------------------------------------------------- POPE

_NEGATIONS = frozenset({"No", "not", "no"})


def parse_yes_no(text: str) -> str:
    """"yes" or "no" for a free-form answer, exactly as POPE's release reads it (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a string, got {type(text).__name__}")
    first = text.split(".", 1)[0].replace(",", "")
    return "no" if any(word in _NEGATIONS for word in first.split(" ")) else "yes"


def _label(label: Any, where: str) -> str:
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower()
    raise ValueError(f"{where}: a label must be 'yes' or 'no', got {label!r}")


def pope_scores(labels: Sequence[str], answers: Sequence[str], *, positive: str = "yes") -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of free-form ``answers`` against yes/no ``labels``.

    Answers are read with :func:`parse_yes_no` (an answer that is already "yes"/"no" stays so); labels must
    be "yes" or "no" (any case). Returns n, tp, fp, tn, fn, accuracy, precision, recall, f1, yes_ratio and
    positive; the formulas are in the module docstring."""
    if positive not in ("yes", "no"):
        raise ValueError(f"positive must be 'yes' or 'no', got {positive!r}")
    labels, answers = list(labels), list(answers)
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    if not labels:
        raise ValueError("no answers to score")
    tp = fp = tn = fn = yes = 0
    for i, (label, answer) in enumerate(zip(labels, answers)):
        truth = _label(label, f"sample {i}") == positive
        pred = parse_yes_no(answer)
        yes += pred == "yes"
        if pred == positive:
            tp, fp = tp + truth, fp + (not truth)
        else:
            fn, tn = fn + truth, tn + (not truth)
    n = len(labels)
    return {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": _ratio(tp + tn, n), "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "yes_ratio": _ratio(yes, n), "positive": positive}


def grouped_pope_scores(groups: Sequence[str], labels: Sequence[str], answers: Sequence[str], *,
                        positive: str = "yes") -> dict[str, dict[str, Any]]:
    """:func:`pope_scores` of each group of samples; ``groups[i]`` names sample i's group. Groups come in
    the order they first appear."""
    groups, labels, answers = list(groups), list(labels), list(answers)
    if not len(groups) == len(labels) == len(answers):
        raise ValueError(f"{len(groups)} groups, {len(labels)} labels and {len(answers)} answers")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return {g: pope_scores([labels[i] for i in idx], [answers[i] for i in idx], positive=positive)
            for g, idx in members.items()}


def pope_scores_by_setting(settings: Sequence[str], labels: Sequence[str],
                           answers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """POPE's scores per negative-sampling setting ("yes" positive), in the order random, popular,
    adversarial (other setting names follow, sorted)."""
    per = grouped_pope_scores(settings, labels, answers, positive="yes")
    order = [s for s in POPE_SETTINGS if s in per] + sorted(s for s in per if s not in POPE_SETTINGS)
    return {s: per[s] for s in order}


def macro_average(per_group: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The equal-weight mean over groups of accuracy, precision, recall, f1 and yes_ratio."""
    if not per_group:
        raise ValueError("no groups to average")
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    return {k: sum(g[k] for g in per_group.values()) / len(per_group) for k in keys}


def _by_id(annotations: Iterable[Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for ann in annotations:
        key = _get(ann, "id")
        if key in out:
            raise ValueError(f"annotation id {key!r} appears twice")
        out[key] = ann
    return out


def _amber_type(ann: Any) -> tuple[str, str | None]:
    kind = _get(ann, "type")
    if kind not in AMBER_TYPES:
        raise ValueError(f"annotation {_get(ann, 'id', '?')!r}: unknown AMBER type {kind!r} "
                         f"(known: {', '.join(AMBER_TYPES)})")
    return AMBER_TYPES[kind]


def amber_discriminative_scores(annotations: Iterable[Any], responses: Mapping[Any, str], *,
                                positive: str = "no") -> dict[str, dict[str, Any]]:
    """AMBER's yes/no questions scored like POPE, per dimension.

    ``annotations``: AMBER annotation records (:class:`~mmalign.eval.formats.AmberAnnotation` or the raw
    JSON objects: id, type, truth); ``responses``: answer text by question id. Every response is scored
    (generative ones are skipped); a response without annotation is an error. Returns :func:`pope_scores`
    for "discriminative" (all), "existence", "attribute", "state", "number", "action", "relation", each only
    when it has questions. ``positive="no"`` is AMBER's convention (module docstring)."""
    by_id = _by_id(annotations)
    labels: dict[str, list[str]] = {g: [] for g in _AMBER_GROUPS}
    answers: dict[str, list[str]] = {g: [] for g in _AMBER_GROUPS}
    for qid, text in responses.items():
        if qid not in by_id:
            raise ValueError(f"response {qid!r} has no annotation")
        ann = by_id[qid]
        dim, sub = _amber_type(ann)
        if dim == "generative":
            continue
        label = _label(_get(ann, "truth"), f"annotation {qid!r}")
        for g in ("discriminative", dim, sub):
            if g is not None:
                labels[g].append(label)
                answers[g].append(text)
    if not labels["discriminative"]:
        raise ValueError("no discriminative response to score")
    return {g: pope_scores(labels[g], answers[g], positive=positive) for g in _AMBER_GROUPS if labels[g]}


# ----------------------------------------------------------------------------- words and plurals

_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """The lower-cased words of ``text``: runs of letters and digits; a hyphen between two such runs keeps
    them one word ("t-shirt"), any other character (space, punctuation, apostrophe) separates words."""
    return _TOKEN.findall(text.lower())


# Plurals that the rules of plural_forms do not produce. Words ending in "man" ("woman", "policeman") and
# "child" ("grandchild") are handled by rule.
IRREGULAR_PLURALS: dict[str, tuple[str, ...]] = {
    "person": ("people", "persons"), "mouse": ("mice",), "ox": ("oxen",), "goose": ("geese",),
    "foot": ("feet",), "tooth": ("teeth",), "louse": ("lice",), "die": ("dice",),
    "knife": ("knives",), "pocketknife": ("pocketknives",), "wife": ("wives",), "life": ("lives",),
    "thief": ("thieves",), "leaf": ("leaves",), "loaf": ("loaves",), "calf": ("calves",),
    "half": ("halves",), "shelf": ("shelves",), "bookshelf": ("bookshelves",), "wolf": ("wolves",),
    "scarf": ("scarves", "scarfs"), "hoof": ("hooves", "hoofs"), "elf": ("elves",),
    "fish": ("fishes",), "bus": ("buses", "busses"), "ski": ("skis",), "tv": ("tvs",),
}
# Nouns whose plural is the same word (they get no other plural).
INVARIANT_NOUNS = frozenset({
    "sheep", "deer", "bison", "moose", "cattle", "aircraft", "watercraft", "hovercraft", "spacecraft",
    "swine", "salmon", "trout", "species", "series", "people", "children", "oxen", "scissors", "skis",
    "glasses", "sunglasses", "pants", "jeans", "shorts", "clothes", "chopsticks",
})
_VOWELS = frozenset("aeiou")


def plural_forms(word: str) -> tuple[str, ...]:
    """The plural spellings of a singular noun (more than one where usage varies: "buffaloes"/"buffalos").

    Rules, first match wins: :data:`IRREGULAR_PLURALS`; :data:`INVARIANT_NOUNS` -> none; "-man" -> "-men";
    "-child" -> "-children"; "-s/-x/-z/-ch/-sh" -> "+es"; consonant + "y" -> "-ies"; "-o" -> "+s" and "+es";
    "-fe" or "-f" (not "-ff", "-ffe") -> "+s" and "-ves"; otherwise "+s". For a multi-word name the last
    word is inflected ("hot dog" -> "hot dogs")."""
    if " " in word:
        head, _, last = word.rpartition(" ")
        return tuple(f"{head} {p}" for p in plural_forms(last))
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in INVARIANT_NOUNS or not word:
        return ()
    if word.endswith("man"):
        return (word[:-3] + "men",)
    if word.endswith("child"):
        return (word + "ren",)
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return (word + "es",)
    if word.endswith("y") and len(word) > 1 and word[-2] not in _VOWELS:
        return (word[:-1] + "ies",)
    if word.endswith("o"):
        return (word + "s", word + "es")
    if word.endswith("fe") and not word.endswith("ffe"):
        return (word + "s", word[:-2] + "ves")
    if word.endswith("f") and not word.endswith("ff"):
        return (word + "s", word[:-1] + "ves")
    return (word + "s",)


def singular_map(words: Iterable[str]) -> dict[str, str]:
    """plural spelling -> singular, for the plurals (:func:`plural_forms`) of single ``words``. A plural that
    is itself one of ``words`` ("people", "skis") is left out, so it keeps its own meaning; when two words
    share a plural spelling, the alphabetically first one is kept."""
    known = set(words)
    out: dict[str, str] = {}
    for w in sorted(known):
        for p in plural_forms(w):
            if p not in known:
                out.setdefault(p, w)
    return out


# ------------------------------------------------------------------------------------------ CHAIR


class Mention(NamedTuple):
    """One mention of a category: the vocabulary word or phrase as found (singular), and its category."""
    word: str
    category: str


class ChairVocabulary:
    """Finds the categories a text mentions, CHAIR's way (module docstring).

    ``synonyms``: category -> words that mean it (the category name included; multi-word allowed);
    ``phrases``: word pairs/triples read as one word -> the word they stand for (a phrase whose word is not
    a synonym mentions nothing, it only keeps its words from counting alone). All multi-word synonyms are
    phrases automatically. ``toilet_seat_rule``: drop "seat" from a text that has "toilet".
    :meth:`coco` is the COCO vocabulary of :mod:`mmalign.eval.coco`."""

    _coco: ChairVocabulary | None = None

    def __init__(self, synonyms: Mapping[str, Sequence[str]], phrases: Mapping[str, str] | None = None, *,
                 toilet_seat_rule: bool = True):
        self.categories: tuple[str, ...] = tuple(synonyms)
        self._category: dict[str, str] = {}
        for category, words in synonyms.items():
            for w in (category, *words):
                w = " ".join(w.lower().split())
                if self._category.setdefault(w, category) != category:
                    raise ValueError(f"{w!r} is a synonym of both {self._category[w]!r} and {category!r}")
        self._phrases: dict[tuple[str, ...], str] = {}
        for phrase, target in (phrases or {}).items():
            self._phrases[tuple(phrase.lower().split())] = " ".join(target.lower().split())
        for w in self._category:
            if " " in w:
                self._phrases.setdefault(tuple(w.split()), w)
        self._longest = max((len(p) for p in self._phrases), default=1)
        vocabulary_words = {part for w in self._category for part in w.split()}
        vocabulary_words.update(part for p, t in self._phrases.items() for part in (*p, *t.split()))
        self._singular = singular_map(vocabulary_words)
        self.toilet_seat_rule = toilet_seat_rule

    @classmethod
    def coco(cls) -> ChairVocabulary:
        """The COCO vocabulary (80 categories, CHAIR's synonyms and phrases), built once."""
        if cls._coco is None:
            cls._coco = cls(COCO_SYNONYMS, COCO_PHRASES)
        return cls._coco

    def category_of(self, word: str) -> str | None:
        """The category of a vocabulary word or phrase (any case, singular), or None."""
        return self._category.get(" ".join(word.lower().split()))

    def words(self, text: str) -> list[str]:
        """The text's words after singularising and reading phrases as one word (before the lookup)."""
        toks = [self._singular.get(t, t) for t in tokenize(text)]
        out, i = [], 0
        while i < len(toks):
            for k in range(min(self._longest, len(toks) - i), 1, -1):
                target = self._phrases.get(tuple(toks[i:i + k]))
                if target is not None:
                    out.append(target)
                    i += k
                    break
            else:
                out.append(toks[i])
                i += 1
        if self.toilet_seat_rule and "toilet" in out:
            out = [w for w in out if w != "seat"]
        return out

    def mention_occurrences(self, text: str) -> list[Mention]:
        """Every mention, in text order (a category mentioned twice appears twice)."""
        return [Mention(w, self._category[w]) for w in self.words(text) if w in self._category]

    def mentions(self, text: str) -> list[str]:
        """The categories the text mentions, each once, in order of first mention."""
        return list(dict.fromkeys(m.category for m in self.mention_occurrences(text)))


def _chair_sample(sample: Any, i: int) -> tuple[Any, str, Any]:
    if isinstance(sample, Mapping):
        if "text" not in sample or "ground_truth" not in sample:
            raise ValueError(f"sample {i}: needs 'text' and 'ground_truth', has {sorted(sample)}")
        return sample.get("id", i), sample["text"], sample["ground_truth"]
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return i, sample[0], sample[1]
    raise ValueError(f"sample {i}: expected a mapping with 'text' and 'ground_truth' or a (text, ground_truth) "
                     f"pair, got {type(sample).__name__}")


def chair_scores(samples: Iterable[Any], vocabulary: ChairVocabulary | None = None, *,
                 unique: bool = True) -> dict[str, Any]:
    """CHAIR_i, CHAIR_s, Recall^coco and mean length of texts against per-image ground truth.

    Each sample is a mapping with "text", "ground_truth" (the categories present: names of the
    vocabulary's categories, e.g. "person" not "man") and optionally "id", or a (text, ground_truth) pair.
    ``unique=True`` counts each mentioned category once per text (docs/math.md §10), ``False`` every occurrence
    (the CHAIR release). Returns chair_i, chair_s, recall, mean_length, n, the pooled counts (mentions,
    hallucinated_mentions, hallucinated_texts, ground_truth_objects, covered_objects, words) and "samples":
    per text its id, mentioned / hallucinated / covered categories (each once, in text order), ground_truth
    (sorted), n_words, n_mentions, n_hallucinated, and its own chair_i and recall (None where the
    denominator is 0)."""
    vocab = vocabulary or ChairVocabulary.coco()
    known = set(vocab.categories)
    details = []
    tot_mentions = tot_hall = hall_texts = tot_gt = tot_cov = tot_words = 0
    for i, sample in enumerate(samples):
        sid, text, gt = _chair_sample(sample, i)
        if not isinstance(text, str):
            raise ValueError(f"sample {sid!r}: text must be a string, got {type(text).__name__}")
        if isinstance(gt, str):
            raise ValueError(f"sample {sid!r}: ground_truth must be a collection of categories, not a string")
        gt = set(gt)
        unknown = sorted(gt - known)
        if unknown:
            raise ValueError(f"sample {sid!r}: ground-truth objects {unknown} are not categories of the "
                             "vocabulary (map synonyms with ChairVocabulary.category_of)")
        occurrences = [m.category for m in vocab.mention_occurrences(text)]
        mentioned = list(dict.fromkeys(occurrences))
        counted = mentioned if unique else occurrences
        n_hall = sum(c not in gt for c in counted)
        covered = [c for c in mentioned if c in gt]
        n_words = len(text.split())
        details.append({
            "id": sid, "mentioned": mentioned, "hallucinated": [c for c in mentioned if c not in gt],
            "covered": covered, "ground_truth": sorted(gt), "n_words": n_words, "n_mentions": len(counted),
            "n_hallucinated": n_hall, "chair_i": n_hall / len(counted) if counted else None,
            "recall": len(covered) / len(gt) if gt else None,
        })
        tot_mentions += len(counted)
        tot_hall += n_hall
        hall_texts += n_hall > 0
        tot_gt += len(gt)
        tot_cov += len(covered)
        tot_words += n_words
    n = len(details)
    if not n:
        raise ValueError("no texts to score")
    return {"chair_i": _ratio(tot_hall, tot_mentions), "chair_s": _ratio(hall_texts, n),
            "recall": _ratio(tot_cov, tot_gt), "mean_length": _ratio(tot_words, n), "n": n,
            "mentions": tot_mentions, "hallucinated_mentions": tot_hall, "hallucinated_texts": hall_texts,
            "ground_truth_objects": tot_gt, "covered_objects": tot_cov, "words": tot_words,
            "unique": unique, "samples": details}


# ----------------------------------------------------------------------------------- AMBER generative


class AmberVocabulary:
    """AMBER's object words: every key and value of its association list (``relation.json``).

    :meth:`nouns` returns a text's object words, one per occurrence, spelled as in the vocabulary: a word
    matches itself (any case) or one of its plurals (:func:`plural_forms`). The vocabulary's words must be
    single words (AMBER's are; hyphenated ones such as "air-conditioning" are single words)."""

    def __init__(self, association: Mapping[str, Sequence[str]]):
        self.association: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in association.items()}
        words = set(self.association) | {w for vs in self.association.values() for w in vs}
        bad = sorted(w for w in words if not isinstance(w, str) or not tokenize(w) == [w.lower()])
        if bad:
            raise ValueError(f"AMBER vocabulary words must be single words, got {bad[:5]}")
        self.words = frozenset(words)
        canonical: dict[str, str] = {}
        for w in sorted(words):
            canonical.setdefault(w.lower(), w)
        self._lookup = {p: canonical[s] for p, s in singular_map(canonical).items()}
        self._lookup.update(canonical)

    def nouns(self, text: str) -> list[str]:
        """The vocabulary words of ``text``, one per occurrence, in order."""
        return [self._lookup[t] for t in tokenize(text) if t in self._lookup]

    def words_for(self, objects: Sequence[str], what: str = "object") -> list[tuple[str, int]]:
        """(word, index of the object it stands for), in the AMBER script's matching order: the associated
        words of every object first, then the objects themselves."""
        pairs = []
        for k, obj in enumerate(objects):
            if obj not in self.association:
                raise ValueError(f"{what} {obj!r} is not in the association list")
            pairs.extend((w, k) for w in self.association[obj])
        pairs.extend((obj, k) for k, obj in enumerate(objects))
        return pairs


def _first_match(word: str, pairs: list[tuple[str, int]]) -> int | None:
    for w, k in pairs:
        if w == word:
            return k
    return None


def amber_generative_scores(annotations: Iterable[Any], responses: Mapping[Any, str],
                            association: Mapping[str, Sequence[str]] | AmberVocabulary,
                            safe_words: Iterable[str] = ()) -> dict[str, Any]:
    """AMBER's CHAIR, Cover, Hal and Cog of image descriptions (module docstring for the rules).

    ``annotations``: AMBER annotation records (id, type, truth, hallu); ``responses``: description by id
    (responses to non-generative ids are skipped; an id without annotation is an error); ``association``:
    the parsed ``relation.json`` (or an :class:`AmberVocabulary` built from it); ``safe_words``: the lines of
    ``safe_words.txt``. Returns chair, cover, hal, cog (fractions in [0, 1]), n, the pooled counts and
    "samples": per response its id, nouns (object-word occurrences), hallucinated (the hallucinated
    occurrences), covered (truth objects covered), cog (hallu objects covered), n_truth, n_hallu."""
    vocab = association if isinstance(association, AmberVocabulary) else AmberVocabulary(association)
    safe = frozenset(safe_words)
    by_id = _by_id(annotations)
    details = []
    tot_nouns = tot_hall = hall_resp = tot_truth = tot_cov = tot_hallu = tot_cog = 0
    for rid, text in responses.items():
        if rid not in by_id:
            raise ValueError(f"response {rid!r} has no annotation")
        ann = by_id[rid]
        if _amber_type(ann)[0] != "generative":
            continue
        if not isinstance(text, str):
            raise ValueError(f"response {rid!r} must be a string, got {type(text).__name__}")
        truth, hallu = list(_get(ann, "truth")), list(_get(ann, "hallu"))
        truth_words = vocab.words_for(truth, f"annotation {rid!r}: truth object")
        hallu_words = vocab.words_for(hallu, f"annotation {rid!r}: hallu object")
        covered, cog = [False] * len(truth), [False] * len(hallu)
        nouns, hallucinated = vocab.nouns(text), []
        for noun in nouns:
            if noun in safe:
                continue
            k = _first_match(noun, truth_words)
            if k is not None:
                covered[k] = True
                continue
            hallucinated.append(noun)
            k = _first_match(noun, hallu_words)
            if k is not None:
                cog[k] = True
        details.append({"id": rid, "nouns": nouns, "hallucinated": hallucinated,
                        "covered": [o for o, c in zip(truth, covered) if c],
                        "cog": [o for o, c in zip(hallu, cog) if c], "n_truth": len(truth), "n_hallu": len(hallu)})
        tot_nouns += len(nouns)
        tot_hall += len(hallucinated)
        hall_resp += bool(hallucinated)
        tot_truth += len(truth)
        tot_cov += sum(covered)
        tot_hallu += len(hallu)
        tot_cog += sum(cog)
    n = len(details)
    if not n:
        raise ValueError("no generative response to score")
    return {"chair": _ratio(tot_hall, tot_nouns), "cover": _ratio(tot_cov, tot_truth),
            "hal": _ratio(hall_resp, n), "cog": _ratio(tot_cog, tot_hallu), "n": n,
            "nouns": tot_nouns, "hallucinated_nouns": tot_hall, "hallucinated_responses": hall_resp,
            "truth_objects": tot_truth, "covered_truth": tot_cov, "hallu_objects": tot_hallu,
            "covered_hallu": tot_cog, "samples": details}
