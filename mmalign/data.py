"""Preference datasets: the canonical record of docs/math.md §8 and adapters for the layouts people ship.

Every pipeline (``mmalign hardness``, ``mmalign bdhs``, the trainer) reads its input through
:func:`iter_records`, which yields one :class:`PairRecord` per input row, in input order, or a
:class:`RecordError` for a row that cannot be read, so a long job can report it and go on.

Sources: a ``.jsonl`` file (one object per line), a ``.json`` file holding a list, a ``.parquet``
file, a directory of ``.parquet`` files (read in name order), or a directory written by Hugging Face
``datasets``' ``save_to_disk`` (needs the ``datasets`` package).

Layouts (``layout="auto"`` picks one from the first row's columns):

========== ======================================================================================
canonical  ``id``, ``image``, ``prompt``, ``chosen``, ``rejected`` (docs/math.md §8)
rlaif-v    openbmb/RLAIF-V-Dataset: ``question`` -> prompt, ``idx`` -> id, ``image`` (embedded
           bytes) or ``image_path``; ``ds_name``, ``origin_dataset``, ``origin_split`` kept
povid      POVID (LLaVA conversation style): the first human turn of ``conversations`` (``<image>``
           tag removed) -> prompt, or ``prompt`` when present; ``image`` -> image
vlfeedback MMInstruction/VLFeedback: one row, 4 ``completions`` rated on 3 aspects; chosen = the
           completion with the highest mean rating, rejected = the lowest (rows whose ratings
           are all equal carry no preference and are reported as errors); ``img_path``/``image``
========== ======================================================================================

``columns={"prompt": "instruction", ...}`` maps canonical names onto other column names for any
other layout. Columns the layout does not consume are carried through to the output unchanged.
"""
from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

CANONICAL = ("id", "image", "prompt", "chosen", "rejected")
IMAGE_TAG = "<image>"


@dataclass
class PairRecord:
    """One preference pair. ``index`` is the row's position in the input (0-based): the key that
    sharding and resuming use. ``line`` is the 1-based line of a JSONL input (None otherwise)."""

    index: int
    line: int | None
    id: str
    image: Any
    prompt: str
    chosen: str
    rejected: str
    extra: dict = field(default_factory=dict)

    def where(self) -> str:
        return where(self.index, self.line, self.id)

    def canonical(self) -> dict:
        """The record as a JSON-ready canonical dict (docs/math.md §8), extra columns after the canonical ones."""
        out = {"id": self.id, "image": image_to_json(self.image), "prompt": self.prompt,
               "chosen": self.chosen, "rejected": self.rejected}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out


class RecordError(ValueError):
    """A row that cannot be used, with where it is: ``record 17 (id=abc, line 18): <what is wrong>``."""

    def __init__(self, index: int, line: int | None, id: str | None, message: str):
        self.index, self.line, self.id, self.message = index, line, id, message
        super().__init__(f"{where(index, line, id)}: {message}")


def where(index: int, line: int | None, id: str | None) -> str:
    parts = [f"id={id}"] if id is not None else []
    if line is not None:
        parts.append(f"line {line}")
    return f"record {index}" + (f" ({', '.join(parts)})" if parts else "")


# ----------------------------------------------------------------------------------------------- rows
def _jsonl_rows(path: Path) -> Iterator[tuple[int | None, dict | Exception]]:
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield lineno, row if isinstance(row, dict) else ValueError(
                f"expected a JSON object, got {type(row).__name__}")


def _json_rows(path: Path) -> Iterator[tuple[int | None, dict | Exception]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (or use .jsonl, one record per line)")
    for row in data:
        yield None, row if isinstance(row, dict) else ValueError(
            f"expected a JSON object, got {type(row).__name__}")


def _parquet_rows(files: list[Path]) -> Iterator[tuple[int | None, dict | Exception]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow ships with `datasets`
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow (or datasets)") from e
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield None, row


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[int | None, dict | Exception]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path} is a Hugging Face dataset directory: reading it needs `pip install datasets`") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else None)
        if split not in ds:
            raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; choose one with split=")
        ds = ds[split]
    ds = ds.cast_column("image", datasets.Image(decode=False)) if "image" in ds.column_names and \
        isinstance(ds.features.get("image"), datasets.Image) else ds
    for row in ds:
        yield None, row


def _source(path: Path, split: str | None) -> Iterator[tuple[int | None, dict | Exception]]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _hf_rows(path, split)
        files = sorted(path.glob("**/*.parquet"))
        if not files:
            raise ValueError(f"{path}: a directory with neither parquet files nor a saved Hugging Face dataset")
        return _parquet_rows(files)
    if not path.exists():
        raise FileNotFoundError(f"input: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows([path])
    raise ValueError(f"input: {path}: expected .jsonl, .json, .parquet or a dataset directory")


def count_records(path: str | os.PathLike) -> int | None:
    """Number of rows, when it is cheap to know (for progress bars); None otherwise."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix.lower() == ".jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if path.suffix.lower() == ".parquet" or path.is_dir():
            import pyarrow.parquet as pq

            files = [path] if path.is_file() else sorted(path.glob("**/*.parquet"))
            if files:
                return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except Exception:  # a count is a nicety: never fail a job over it
        return None
    return None


# -------------------------------------------------------------------------------------------- layouts
def _text(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"missing column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"column {key!r}: expected a string, got {type(value).__name__}")
    return value


def _canonical(row: dict, cols: dict) -> dict:
    out = {name: _text(row, cols.get(name, name)) for name in ("prompt", "chosen", "rejected")}
    out["id"] = row.get(cols.get("id", "id"))
    out["image"] = row.get(cols.get("image", "image"))
    return out


def _rlaif_v(row: dict, cols: dict) -> dict:
    image = row.get("image")
    if not image or (isinstance(image, dict) and not image.get("bytes") and not image.get("path")):
        image = row.get("image_path")
    rid = row.get("idx")
    return {"id": f"{row['ds_name']}-{rid}" if row.get("ds_name") and rid is not None else rid,
            "image": image, "prompt": _text(row, "question"), "chosen": _text(row, "chosen"),
            "rejected": _text(row, "rejected")}


def _povid(row: dict, cols: dict) -> dict:
    if isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    else:
        turns = row.get("conversations")
        human = [t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "human"]
        if not human or not isinstance(human[0], str):
            raise ValueError("missing column 'prompt' and no human turn in 'conversations'")
        prompt = human[0]
    prompt = prompt.replace(IMAGE_TAG + "\n", "").replace(IMAGE_TAG, "").strip()
    return {"id": row.get("id"), "image": row.get("image"), "prompt": prompt,
            "chosen": _text(row, "chosen"), "rejected": _text(row, "rejected")}


def _rating(annotation: Any) -> float | None:
    if not isinstance(annotation, dict):
        return None
    scores = []
    for aspect in annotation.values():
        try:
            scores.append(float((aspect or {}).get("Rating")))
        except (TypeError, ValueError):
            continue  # "N/A" or a missing rating: that aspect does not count
    return sum(scores) / len(scores) if scores else None


def _vlfeedback(row: dict, cols: dict) -> dict:
    comps = row.get("completions")
    if isinstance(comps, dict):  # `datasets` returns a Sequence of structs as a dict of lists
        keys = list(comps)
        comps = [dict(zip(keys, values)) for values in zip(*(comps[k] for k in keys))]
    if not isinstance(comps, list) or len(comps) < 2:
        raise ValueError("column 'completions': expected at least 2 rated completions")
    rated = [(r, i) for i, c in enumerate(comps) if (r := _rating(c.get("annotations"))) is not None]
    if len(rated) < 2 or max(rated)[0] == min(rated)[0]:
        raise ValueError("no preference: fewer than 2 rated completions, or all rated equally")
    best, worst = max(rated, key=lambda x: (x[0], -x[1]))[1], min(rated, key=lambda x: (x[0], x[1]))[1]
    image = row.get("image") or row.get("img_path")
    return {"id": row.get("id"), "image": image, "prompt": _text(row, "prompt"),
            "chosen": _text(comps[best], "response"), "rejected": _text(comps[worst], "response"),
            "chosen_model": comps[best].get("model"), "rejected_model": comps[worst].get("model")}


#: layout -> (adapter, columns it consumes). One table: add a layout here.
LAYOUTS: dict[str, tuple[Callable[[dict, dict], dict], tuple[str, ...]]] = {
    "canonical": (_canonical, CANONICAL),
    "rlaif-v": (_rlaif_v, ("ds_name", "idx", "image", "image_path", "question", "chosen", "rejected")),
    "povid": (_povid, ("id", "image", "conversations", "prompt", "chosen", "rejected")),
    "vlfeedback": (_vlfeedback, ("id", "image", "img_path", "prompt", "models", "completions")),
}


def detect_layout(row: dict) -> str:
    keys = set(row)
    if "completions" in keys:
        return "vlfeedback"
    if {"question", "chosen", "rejected"} <= keys:
        return "rlaif-v"
    if {"conversations", "chosen", "rejected"} <= keys and "prompt" not in keys:
        return "povid"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "canonical"
    raise ValueError(f"cannot tell the dataset layout from its columns {sorted(keys)}: pass layout= "
                     f"(one of {sorted(LAYOUTS)}) or map columns with columns={{'prompt': ...}}")


def iter_records(path: str | os.PathLike, *, layout: str = "auto", columns: dict | None = None,
                 split: str | None = None) -> Iterator[PairRecord | RecordError]:
    """Yield a :class:`PairRecord` per input row, in order, or a :class:`RecordError` for a row that
    cannot be read (bad JSON, a missing column, no preference). Problems with the source itself (no
    such file, unknown format or layout) raise at once."""
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'auto' or one of {sorted(LAYOUTS)}, got {layout!r}")
    columns = dict(columns or {})
    unknown = set(columns) - set(CANONICAL)
    if unknown:
        raise ValueError(f"columns: keys must be canonical names {CANONICAL}, got {sorted(unknown)}")
    if columns and layout == "auto":
        layout = "canonical"
    adapter = consumed = None
    for index, (line, row) in enumerate(_source(Path(path), split)):
        rid = row.get("id") if isinstance(row, dict) else None
        if isinstance(row, Exception):
            yield RecordError(index, line, None, str(row))
            continue
        if adapter is None:
            name = detect_layout(row) if layout == "auto" else layout
            adapter, consumed = LAYOUTS[name]
            consumed = set(consumed) | set(columns.values())
        try:
            fields = adapter(row, columns)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            yield RecordError(index, line, None if rid is None else str(rid), str(e))
            continue
        rid = fields.pop("id")
        rid = str(index) if rid is None or rid == "" else str(rid)
        extra = {k: v for k, v in fields.items() if k not in ("image", "prompt", "chosen", "rejected")}
        extra.update({k: v for k, v in row.items() if k not in consumed and k not in CANONICAL and _jsonable(v)})
        yield PairRecord(index, line, rid, fields["image"], fields["prompt"], fields["chosen"],
                         fields["rejected"], extra)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


# --------------------------------------------------------------------------------------------- images
def image_to_json(image: Any) -> Any:
    """A JSON-ready form of an image field: paths stay paths; embedded bytes become
    ``{"bytes_base64": ...}`` (read back by :func:`open_image`)."""
    if isinstance(image, (bytes, bytearray)):
        return {"bytes_base64": base64.b64encode(bytes(image)).decode("ascii")}
    if isinstance(image, dict):
        if image.get("bytes"):
            return {"bytes_base64": base64.b64encode(bytes(image["bytes"])).decode("ascii"),
                    **({"path": image["path"]} if image.get("path") else {})}
        return {k: v for k, v in image.items() if v is not None}
    if image is not None and not isinstance(image, str):
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # a decoded PIL image
        return {"bytes_base64": base64.b64encode(buf.getvalue()).decode("ascii")}
    return image


def open_image(image: Any, root: str | os.PathLike | None = None):
    """Decode an image field into an RGB ``PIL.Image``: a path (relative to ``root`` unless absolute),
    raw bytes, ``{"bytes": ...}`` / ``{"bytes_base64": ...}`` / ``{"path": ...}``, or a PIL image.
    Raises ``ValueError`` naming the path or the field when it is missing, unreadable or corrupt."""
    from PIL import Image, UnidentifiedImageError

    if image is None or image == "":
        raise ValueError("no image: the record's 'image' field is empty")
    if hasattr(image, "convert") and not isinstance(image, (str, bytes, dict)):
        return image.convert("RGB")
    data = None
    if isinstance(image, dict):
        if image.get("bytes"):
            data = bytes(image["bytes"])
        elif image.get("bytes_base64"):
            data = base64.b64decode(image["bytes_base64"])
        elif image.get("path"):
            image = image["path"]
        else:
            raise ValueError(f"image field has neither bytes nor a path: keys {sorted(image)}")
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    if data is None:
        if not isinstance(image, str):
            raise ValueError(f"image: expected a path, bytes or a dict, got {type(image).__name__}")
        if "://" in image:
            raise ValueError(f"image {image!r}: URLs are not fetched; download the images and pass their directory")
        path = Path(image) if root is None or os.path.isabs(image) else Path(root) / image
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"image {str(path)!r}: cannot read ({e.strerror or e})") from None
        name = str(path)
    else:
        name = "embedded image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{name}: not a decodable image ({e})") from None
