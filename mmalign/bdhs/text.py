"""The text side of BDHS (docs/math.md §7): sentences of y+, the yes/no swap, random word-boundary cuts, and
where a completion stops. Every random choice takes a ``random.Random`` so that a pair's draws depend
only on (seed, pair, try), never on the batch it runs in."""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from ..hardness.split import split_sentences

_YES_NO = re.compile(r"^(\s*)(Yes|yes|No|no)\b")
_SWAP = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}


def rng_for(seed: int, *keys) -> random.Random:
    """A generator that depends only on ``seed`` and ``keys`` (e.g. the pair id and the try)."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sentences(text: str) -> list[str]:
    """y+ split into sentences (lines, then sentence ends; see :func:`mmalign.hardness.split.split_sentences`),
    each keeping the whitespace that preceded it so that joining them gives back the text."""
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        for s in split_sentences(line):
            start = text.index(s, pos)
            out.append(text[pos:start + len(s)])
            pos = start + len(s)
    if out and pos < len(text):
        out[-1] += text[pos:]
    return out or ([text] if text else [])


def swap_yes_no(sentence: str, rng: random.Random, p: float = 0.5) -> str:
    """If the sentence starts with Yes/yes/No/no, swap it (keeping case) with probability ``p``."""
    m = _YES_NO.match(sentence)
    if m and rng.random() < p:
        return sentence[:m.start(2)] + _SWAP[m.group(2)] + sentence[m.end(2):]
    return sentence


def cut(sentence: str, rng: random.Random) -> tuple[str, str]:
    """Cut at a random word boundary: (head, tail) with head + tail == sentence. The head holds at least
    the first word, so the model always continues a started sentence; a one-word sentence is cut after it."""
    bounds = [m.start() for m in re.finditer(r"\s+\S", sentence)]  # before each later word's whitespace
    lead = len(sentence) - len(sentence.lstrip())
    first_word_end = next((m.start() for m in re.finditer(r"\s", sentence[lead:])), len(sentence) - lead) + lead
    bounds = [b for b in bounds if b >= first_word_end] or [len(sentence)]
    at = rng.choice(bounds)
    return sentence[:at], sentence[at:]


def stop_at_full_stop(text: str) -> tuple[str, bool]:
    """A completion up to and including its first full stop: (text, stopped)."""
    i = text.find(".")
    return (text[:i + 1], True) if i >= 0 else (text, False)


@dataclass(frozen=True)
class Plan:
    """One try's text plan for a pair. Sentence k is completed from ``y+_<k`` (the ground truth) plus
    ``heads[k]``; unless ``swapped[k]``, ``heads[k]`` is a prefix of ``sentences[k]`` (so its context is
    a prefix of the ground truth and shares one prefill with every other sentence)."""

    sentences: list[str]
    heads: list[str]
    swapped: list[bool]


def plan(chosen: str, rng: random.Random, swap_p: float = 0.5) -> Plan:
    """Sentences of y+, each with its yes/no swap (probability ``swap_p``) and a random word-boundary cut."""
    sents, heads, swapped = sentences(chosen), [], []
    for s in sents:
        t = swap_yes_no(s, rng, swap_p)
        heads.append(cut(t, rng)[0])
        swapped.append(t != s)
    return Plan(sents, heads, swapped)
