"""Readers for the public files of POPE, COCO and AMBER, checked record by record.

Every reader raises :class:`FormatError` (a ``ValueError``) naming the file and the record (line number for
JSON Lines, position and id for JSON arrays) for malformed input; a missing file raises the usual
``FileNotFoundError``. ``limit`` keeps the first ``limit`` records in file order (None: all).

POPE (github.com/RUCAIBox/POPE, ``output/coco/coco_pope_{random,popular,adversarial}.json``): JSON Lines
despite the extension, one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
     "label": "yes"}

The setting is not in the records: :func:`read_pope_questions` takes it from the file name (or the
``setting`` argument). Answers (:func:`read_pope_answers`) are JSON Lines with ``question_id`` and the answer
under ``text`` (LLaVA's ``model_vqa_loader`` output) or ``answer`` (the key POPE's ``evaluate.py`` reads).

COCO (``instances_*.json``, ``captions_*.json``): :func:`read_coco_ground_truth` gives each image the CHAIR
ground truth of docs/math.md §10: its annotated categories together with the categories its reference captions
mention (found with the same :class:`~mmalign.eval.metrics.ChairVocabulary` as the texts under test). Like
the CHAIR release, several files can be merged (train2014 + val2014).

AMBER (github.com/junyangwang0410/AMBER, ``data/``): ``query/query_*.json`` is a JSON array of
``{"id", "image", "query"}``; ``annotations.json`` an array of ``{"id", "type", "truth"}`` where a generative
record (type "generative") has lists ``truth`` (objects present) and ``hallu`` (hallucination-prone objects)
and a discriminative one has ``truth`` "yes"/"no"; ``relation.json`` an object mapping each object word to
its associated words; ``safe_words.txt`` one word per line; responses an array of ``{"id", "response"}``.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .metrics import AMBER_TYPES, POPE_SETTINGS, ChairVocabulary

__all__ = [
    "FormatError", "PopeQuestion", "AmberQuery", "AmberAnnotation", "read_pope_questions", "read_pope_answers",
    "read_coco_ground_truth", "read_amber_queries", "read_amber_annotations", "read_amber_association",
    "read_amber_safe_words", "read_amber_responses",
]

PathLike = Union[str, "os.PathLike[str]"]


class FormatError(ValueError):
    """Malformed input: ``path`` is the file, ``record`` says which record (None: the file as a whole)."""

    def __init__(self, path: PathLike, record: str | None, problem: str):
        self.path, self.record, self.problem = os.fspath(path), record, problem
        super().__init__(f"{self.path}: {record}: {problem}" if record else f"{self.path}: {problem}")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question. ``object`` is parsed from "Is there a/an {object} in the image?" (None if the
    text has another form); ``setting`` is random / popular / adversarial, or None if unknown."""
    question_id: int | str
    image: str
    text: str
    label: str
    setting: str | None = None
    object: str | None = None


@dataclass(frozen=True)
class AmberQuery:
    id: int
    image: str
    query: str


@dataclass(frozen=True)
class AmberAnnotation:
    """One AMBER annotation: ``truth`` is a tuple of objects for type "generative" (then ``hallu`` holds the
    hallucination-prone objects), else "yes" or "no"."""
    id: int
    type: str
    truth: tuple[str, ...] | str
    hallu: tuple[str, ...] = field(default=())


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or an integer >= 0, got {limit!r}")


def _json_lines(path: PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of a JSON Lines file; a file that is one JSON array (some
    copies of POPE's files) is read as such."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        yield from _json_array(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, f"line {lineno}", f"not valid JSON ({e.msg} at column {e.colno})") from None


def _load_json(path: PathLike, text: str | None = None) -> Any:
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(path, None, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _json_array(path: PathLike, text: str | None = None) -> Iterator[tuple[str, Any]]:
    data = _load_json(path, text)
    if not isinstance(data, list):
        raise FormatError(path, None, f"expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        where = f"record {i}"
        if isinstance(rec, dict) and "id" in rec:
            where += f" (id {rec['id']!r})"
        yield where, rec


def _field(path: PathLike, where: str, rec: Any, name: str, types: type | tuple[type, ...]) -> Any:
    if not isinstance(rec, dict):
        raise FormatError(path, where, f"expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise FormatError(path, where, f"missing field {name!r}")
    value = rec[name]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise FormatError(path, where, f"field {name!r} must be {names}, got {value!r}")
    return value


def _yes_no(path: PathLike, where: str, value: str, name: str) -> str:
    if value.strip().lower() not in ("yes", "no"):
        raise FormatError(path, where, f"field {name!r} must be 'yes' or 'no', got {value!r}")
    return value.strip().lower()


def _take(items: Iterable[Any], limit: int | None) -> Iterator[Any]:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


_POPE_QUESTION = re.compile(r"\s*is there an? (.+?) in the image\?\s*", re.IGNORECASE)


def read_pope_questions(path: PathLike, *, setting: str | None = None,
                        limit: int | None = None) -> list[PopeQuestion]:
    """POPE questions of one file. ``setting`` defaults to the setting named in the file name
    ("coco_pope_popular.json" -> "popular"), else None."""
    _check_limit(limit)
    if setting is None:
        found = [s for s in POPE_SETTINGS if s in Path(path).name.lower()]
        setting = found[0] if len(found) == 1 else None
    elif setting not in POPE_SETTINGS:
        raise ValueError(f"setting must be one of {POPE_SETTINGS}, got {setting!r}")
    out, seen = [], set()
    for where, rec in _take(_json_lines(path), limit):
        qid = _field(path, where, rec, "question_id", (int, str))
        if qid in seen:
            raise FormatError(path, where, f"question_id {qid!r} appears twice")
        seen.add(qid)
        text = _field(path, where, rec, "text", str)
        m = _POPE_QUESTION.fullmatch(text)
        out.append(PopeQuestion(question_id=qid, image=_field(path, where, rec, "image", str), text=text,
                                label=_yes_no(path, where, _field(path, where, rec, "label", str), "label"),
                                setting=setting, object=m.group(1) if m else None))
    return out


def read_pope_answers(path: PathLike, *, limit: int | None = None) -> dict[int | str, str]:
    """Answer text by question_id, from JSON Lines records with ``question_id`` and ``text`` or ``answer``."""
    _check_limit(limit)
    out: dict[int | str, str] = {}
    for where, rec in _take(_json_lines(path), limit):
        qid = _field(path, where, rec, "question_id", (int, str))
        if qid in out:
            raise FormatError(path, where, f"question_id {qid!r} appears twice")
        key = "text" if isinstance(rec, dict) and "text" in rec else "answer"
        if isinstance(rec, dict) and key not in rec:
            raise FormatError(path, where, "missing the answer: no field 'text' or 'answer'")
        out[qid] = _field(path, where, rec, key, str)
    return out


def _paths(paths: PathLike | Iterable[PathLike] | None) -> list[PathLike]:
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


def _coco_list(path: PathLike, key: str, kind: str) -> list:
    """The list ``key`` of a COCO ``kind`` file (instances, captions), or FormatError naming the file."""
    data = _load_json(path)
    article = "an" if kind[0] in "aeiou" else "a"
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise FormatError(path, None, f"missing list {key!r} (is this {article} {kind}_*.json file?)")
    return data[key]


def read_coco_ground_truth(instances: PathLike | Iterable[PathLike],
                           captions: PathLike | Iterable[PathLike] | None = None, *,
                           vocabulary: ChairVocabulary | None = None, image_ids: Iterable[int] | None = None,
                           limit: int | None = None) -> dict[int, frozenset[str]]:
    """CHAIR ground truth per COCO image id: annotated categories | categories mentioned in its captions.

    ``instances``: one or more ``instances_*.json`` (their images, categories and annotations are merged);
    ``captions``: zero or more ``captions_*.json``. The images are those of the instances files (an image
    without any annotation gets an empty set before captions), restricted to ``image_ids`` if given (an id
    missing from the files is an error), then to the first ``limit`` in file order. Category names must be
    categories of ``vocabulary`` (default: :meth:`ChairVocabulary.coco`)."""
    _check_limit(limit)
    vocab = vocabulary or ChairVocabulary.coco()
    order: list[int] = []
    gt: dict[int, set[str]] = {}
    pending: list[tuple[PathLike, str, int, int]] = []
    cat_names: dict[int, str] = {}
    for path in _paths(instances):
        data = _load_json(path)
        if not isinstance(data, dict):
            raise FormatError(path, None, f"expected a COCO instances object, got {type(data).__name__}")
        for key in ("images", "categories", "annotations"):
            if not isinstance(data.get(key), list):
                raise FormatError(path, None, f"missing list {key!r} (is this an instances_*.json file?)")
        for i, cat in enumerate(data["categories"]):
            where = f"categories[{i}]"
            cid = _field(path, where, cat, "id", int)
            name = _field(path, where, cat, "name", str)
            category = vocab.category_of(name)
            if category is None:
                raise FormatError(path, where, f"category {name!r} is not in the vocabulary")
            if cat_names.setdefault(cid, category) != category:
                raise FormatError(path, where, f"category id {cid} is {cat_names[cid]!r} in an earlier file")
        for i, img in enumerate(data["images"]):
            iid = _field(path, f"images[{i}]", img, "id", int)
            if iid not in gt:
                gt[iid] = set()
                order.append(iid)
        for i, ann in enumerate(data["annotations"]):
            where = f"annotations[{i}]"
            pending.append((path, where, _field(path, where, ann, "image_id", int),
                            _field(path, where, ann, "category_id", int)))
    for path, where, iid, cid in pending:
        if cid not in cat_names:
            raise FormatError(path, where, f"unknown category_id {cid}")
        if iid not in gt:
            raise FormatError(path, where, f"image_id {iid} is not among the images")
        gt[iid].add(cat_names[cid])
    if image_ids is not None:
        wanted = list(dict.fromkeys(image_ids))
        missing = [i for i in wanted if i not in gt]
        if missing:
            raise ValueError(f"image ids {missing[:10]} are not in {[os.fspath(p) for p in _paths(instances)]}")
        keep = set(wanted)
        order = [i for i in order if i in keep]
    order = order[:limit] if limit is not None else order
    selected = set(order)
    for path in _paths(captions):
        for i, ann in enumerate(_coco_list(path, "annotations", "captions")):
            where = f"annotations[{i}]"
            iid = _field(path, where, ann, "image_id", int)
            if iid in selected:
                gt[iid].update(vocab.mentions(_field(path, where, ann, "caption", str)))
    return {i: frozenset(gt[i]) for i in order}


def read_coco_images(instances: PathLike | Iterable[PathLike], *, image_ids: Iterable[int] | None = None,
                     limit: int | None = None) -> dict[int, str]:
    """File name (``file_name``) per COCO image id, in file order, restricted like
    :func:`read_coco_ground_truth` (``image_ids``, then the first ``limit``)."""
    _check_limit(limit)
    names: dict[int, str] = {}
    for path in _paths(instances):
        for i, img in enumerate(_coco_list(path, "images", "instances")):
            where = f"images[{i}]"
            names.setdefault(_field(path, where, img, "id", int), _field(path, where, img, "file_name", str))
    order = list(names)
    if image_ids is not None:
        keep = set(image_ids)
        order = [i for i in order if i in keep]
    return {i: names[i] for i in (order[:limit] if limit is not None else order)}


def coco_vocabulary(instances: PathLike | Iterable[PathLike]):
    """A :class:`ChairVocabulary` whose categories are the instances files' own category names (each its only
    synonym, with its plural): CHAIR over a dataset with other objects than COCO's (the demo's shapes)."""
    names: list[str] = []
    for path in _paths(instances):
        for i, cat in enumerate(_coco_list(path, "categories", "instances")):
            name = _field(path, f"categories[{i}]", cat, "name", str)
            if name not in names:
                names.append(name)
    return ChairVocabulary({name: [name] for name in names}, phrases={})


def _unique_ids(path: PathLike, limit: int | None) -> Iterator[tuple[str, Any, int]]:
    """(where, record, its int ``id``) of a JSON array file of records, an id seen twice being an error."""
    _check_limit(limit)
    seen = set()
    for where, rec in _take(_json_array(path), limit):
        rid = _field(path, where, rec, "id", int)
        if rid in seen:
            raise FormatError(path, where, f"id {rid} appears twice")
        seen.add(rid)
        yield where, rec, rid


def read_amber_queries(path: PathLike, *, limit: int | None = None) -> list[AmberQuery]:
    """The questions of an AMBER ``query_*.json``."""
    return [AmberQuery(qid, _field(path, where, rec, "image", str), _field(path, where, rec, "query", str))
            for where, rec, qid in _unique_ids(path, limit)]


def _word_list(path: PathLike, where: str, rec: dict, name: str) -> tuple[str, ...]:
    words = _field(path, where, rec, name, list)
    if not all(isinstance(w, str) for w in words):
        raise FormatError(path, where, f"field {name!r} must be a list of strings, got {words!r}")
    return tuple(words)


def read_amber_annotations(path: PathLike, *, limit: int | None = None) -> list[AmberAnnotation]:
    """The records of AMBER's ``annotations.json`` (generative ones with truth and hallu lists)."""
    out = []
    for where, rec, aid in _unique_ids(path, limit):
        kind = _field(path, where, rec, "type", str)
        if kind not in AMBER_TYPES:
            raise FormatError(path, where, f"unknown type {kind!r} (known: {', '.join(AMBER_TYPES)})")
        if kind == "generative":
            out.append(AmberAnnotation(aid, kind, _word_list(path, where, rec, "truth"),
                                       _word_list(path, where, rec, "hallu")))
        else:
            out.append(AmberAnnotation(aid, kind, _yes_no(path, where, _field(path, where, rec, "truth", str),
                                                          "truth")))
    return out


def read_amber_association(path: PathLike) -> dict[str, tuple[str, ...]]:
    """AMBER's ``relation.json``: object word -> associated words."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise FormatError(path, None, f"expected a JSON object of word lists, got {type(data).__name__}")
    out = {}
    for word, assoc in data.items():
        if not isinstance(assoc, list) or not all(isinstance(w, str) for w in assoc):
            raise FormatError(path, f"entry {word!r}", f"must be a list of strings, got {assoc!r}")
        out[word] = tuple(assoc)
    return out


def read_amber_safe_words(path: PathLike) -> tuple[str, ...]:
    """AMBER's ``safe_words.txt``: one word per line (surrounding spaces and blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        return tuple(w.strip() for w in f if w.strip())


def read_amber_responses(path: PathLike, *, limit: int | None = None) -> dict[int, str]:
    """Responses by id from an AMBER inference file: a JSON array of ``{"id", "response"}`` (JSON Lines with
    the same records is accepted too)."""
    _check_limit(limit)
    out: dict[int, str] = {}
    for where, rec in _take(_json_lines(path), limit):
        rid = _field(path, where, rec, "id", int)
        if rid in out:
            raise FormatError(path, where, f"id {rid} appears twice")
        out[rid] = _field(path, where, rec, "response", str)
    return out
