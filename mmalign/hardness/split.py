"""Sub-sentence splitters (docs/math.md §4 step 1).

``split_rules(text)`` needs no model: lines (list items lose their bullets), then sentences (a
``.``/``!``/``?`` followed by a space ends one, except after an abbreviation such as "Dr." or "e.g.",
a single initial, or before a lower-case word; "3.5" has no space and stays whole), then clauses at
``;`` and at ", and" / ", but" / ", yet" / ", so" (the conjunction is dropped) and at ", while" /
", which" / ", whereas" / ", although" / ", though" / ", because" (kept with its clause).
Pieces are stripped of surrounding spaces and trailing commas; pieces with no letter or digit are
dropped, so no piece is ever empty.

:class:`LLMSplitter` asks a local Hugging Face causal LM, with a few-shot prompt, for one
self-contained statement per line (the paper's LLaMA-3 step). Output that does not parse (no
``- `` statement line) falls back to the rules for that response and is counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ABBREVIATIONS = frozenset(
    "dr mr mrs ms prof st jr sr vs etc e.g i.e eg ie fig figs no nos approx inc ltd co mt ca cf al "
    "u.s u.k a.m p.m dept est min max avg vol".split())
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d)\]]*\s+")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d{1,3}[.)]|[a-zA-Z]\))\s+")
_CLAUSE = re.compile(r"\s*;\s*|,\s+(?:(?:and|but|yet|so)\s+|(?=(?:while|which|whereas|although|though|because)\b))",
                     re.IGNORECASE)
_WORD = re.compile(r"[\w.]+$")


def _is_boundary(text: str, start: int, end: int) -> bool:
    """Whether the punctuation run text[start:end] ends a sentence."""
    following = text[end:end + 1]
    if following and following.islower():
        return False
    if text[start] != ".":
        return True
    word = _WORD.search(text, 0, start)
    word = word.group(0).lower() if word else ""
    return not (word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()))


def split_sentences(text: str) -> list[str]:
    """Sentences of one line of text (see the module docstring)."""
    out, begin = [], 0
    for m in _BOUNDARY.finditer(text):
        punct_end = m.start() + len(m.group(0).rstrip())
        if _is_boundary(text, m.start(), m.end()):
            out.append(text[begin:punct_end])
            begin = m.end()
    out.append(text[begin:])
    return [s.strip() for s in out if s.strip()]


def _clean(piece: str) -> str:
    return piece.strip().rstrip(",;:").strip()


def split_rules(text: str) -> list[str]:
    """Split a response into sub-sentences with the rules of the module docstring."""
    pieces = []
    for line in text.splitlines():
        line = _BULLET.sub("", line, count=1)
        for sentence in split_sentences(line):
            pieces.extend(_clean(c) for c in _CLAUSE.split(sentence))
    return [p for p in pieces if any(ch.isalnum() for ch in p)]


@dataclass(frozen=True)
class Split:
    """The sub-sentences of one response, and whether the LLM splitter fell back to the rules."""

    pieces: list[str]
    fallback: bool = False


class RulesSplitter:
    name = "rules"

    def split_many(self, texts: list[str]) -> list[Split]:
        return [Split(split_rules(t)) for t in texts]


FEW_SHOT = """Rewrite the text as a list of simple, self-contained statements, one per line, each line \
starting with "- ". Keep every fact, add nothing.

Text: A brown dog sits on a red mat, and a cat sleeps next to it.
Statements:
- A brown dog sits on a red mat.
- A cat sleeps next to the dog.

Text: There are three apples on the table; the largest one is green.
Statements:
- There are three apples on the table.
- The largest apple is green.

Text: {text}
Statements:
"""


def parse_statements(generated: str) -> list[str] | None:
    """The ``- `` lines at the start of a generation (stopping at the first other non-empty line),
    or None when there is none or one is empty: the output is malformed."""
    out = []
    for line in generated.splitlines():
        stripped = line.strip()
        if not stripped:
            if out:
                break
            continue
        if not stripped.startswith("- "):
            break
        statement = stripped[2:].strip()
        if not any(ch.isalnum() for ch in statement):
            return None
        out.append(statement)
    return out or None


class LLMSplitter:
    """Split with a local causal LM (greedy decoding, left-padded batches). Malformed output falls back
    to :func:`split_rules` for that response (``Split.fallback`` is True)."""

    name = "llm"

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_new_tokens: int = 256):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens: expected >= 1, got {batch_size}, {max_new_tokens}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype=None, **kwargs) -> "LLMSplitter":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).to(device)
        return cls(model, tokenizer, **kwargs)

    def generate(self, texts: list[str]) -> list[str]:
        import torch

        from ..models.prompts import chat_prompt

        prompts = [FEW_SHOT.format(text=" ".join(t.split())) for t in texts]
        chat = [chat_prompt(self.tokenizer, p) for p in prompts]  # an instruct LM's turn (LLaMA-3-Instruct, as DAMO)
        templated = chat[0] is not None
        enc = self.tokenizer(chat if templated else prompts, return_tensors="pt", padding=True,
                             add_special_tokens=not templated).to(self.model.device)  # a template holds its BOS
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def split_many(self, texts: list[str]) -> list[Split]:
        results: list[Split] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i:i + self.batch_size]
            for text, generated in zip(chunk, self.generate(chunk)):
                statements = parse_statements(generated) if text.strip() else []
                results.append(Split(statements) if statements is not None else Split(split_rules(text), True))
        return results
