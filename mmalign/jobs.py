"""Resumable, sharded record jobs (shared by ``mmalign hardness`` and ``mmalign bdhs``).

A job turns every input record into one result line. Layout next to the output ``OUT``::

    OUT.work/job.json                     the job's parameters (a resume with others is refused)
    OUT.work/shard-00000-of-00002.jsonl   one JSON line per finished record of that shard
    OUT.work/shard-00000-of-00002.done    written when that shard has finished
    OUT.work/merge.lock                   taken by the one process that writes OUT

* Results are appended one batch at a time (one ``write`` + ``fsync``): a run killed at any moment
  loses at most the batch in flight. On restart the work file is read back, a torn last line is cut
  off, and the records it holds are skipped, so nothing is redone or written twice.
* Shard ``I/N`` owns the records whose input index ``i`` has ``i % N == I``. Under ``torchrun`` the
  shard comes from ``RANK``/``WORLD_SIZE``. Each shard writes only its own file; when the last shard
  finishes, whichever process takes ``merge.lock`` first merges (so no process group is needed and
  shards may even run at different times or on different machines sharing the directory).
* The final output is written to a temporary file and renamed into place (atomic).
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


class JobError(RuntimeError):
    """The job cannot start or resume as asked (mismatched parameters, shard layout, ...)."""


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard: expected I/N with 0 <= I < N, got {self.index}/{self.count}")

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """``"I/N"``; None means: from torchrun's ``RANK``/``WORLD_SIZE`` when set, else ``0/1``."""
        if text is None:
            return cls.from_env()
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: expected I/N such as 0/4, got {text!r}") from None
        return cls(i, n)

    @classmethod
    def from_env(cls) -> "Shard":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, index: int) -> bool:
        return index % self.count == self.index

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, write: Callable) -> None:
    """Like :func:`atomic_write` for writers that need a path (parquet, PNG): ``write(tmp_path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class WorkDir:
    """The work directory of one job and shard (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, shard: Shard, params: dict):
        self.out = Path(out)
        self.dir = self.out.with_name(self.out.name + ".work")
        self.shard = shard
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_params(params)
        self._check_shards()
        self.file = self.dir / f"{shard.name}.jsonl"

    # -------------------------------------------------------------------------------- consistency
    def _check_params(self, params: dict) -> None:
        meta = self.dir / "job.json"
        params = json.loads(json.dumps(params, default=str))
        if meta.exists():
            old = json.loads(meta.read_text())
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            if diff:
                changes = ", ".join(f"{k}: {old.get(k)!r} -> {params.get(k)!r}" for k in diff)
                raise JobError(f"{self.dir} holds a job with other parameters ({changes}); resume with the "
                               f"same parameters, or delete {self.dir} to start over")
        else:
            atomic_write(meta, lambda f: json.dump(params, f, indent=1, sort_keys=True))

    def _check_shards(self) -> None:
        counts = {int(p.stem.split("-of-")[1]) for p in self.dir.glob("shard-*-of-*.jsonl")}
        counts.discard(self.shard.count)
        if counts:
            raise JobError(f"{self.dir} holds work split into {sorted(counts)} shards, and this run uses "
                           f"{self.shard.count}: resume with the same shard count, or delete {self.dir}")

    # ------------------------------------------------------------------------------------- results
    def load(self) -> dict[int, dict]:
        """This shard's finished results, by input index. A torn last line (a kill during the write)
        is cut off the file."""
        return self._read(self.file, repair=True)

    @staticmethod
    def _read(path: Path, repair: bool = False) -> dict[int, dict]:
        results: dict[int, dict] = {}
        if not path.exists():
            return results
        good = 0
        with open(path, "rb") as f:
            for raw in f:
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("torn line")
                    item = json.loads(raw)
                    results[int(item["index"])] = item
                except (ValueError, KeyError, TypeError):
                    break
                good += len(raw)
        if good < path.stat().st_size:
            if not repair:
                raise JobError(f"{path}: unreadable after byte {good}")
            with open(path, "r+b") as f:
                f.truncate(good)
        return results

    def append(self, results: Iterable[dict]) -> None:
        """Append results (each with an ``index``) durably, all in one write."""
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=True) + "\n" for r in results)
        if not text:
            return
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------------------------- completion
    def _done_path(self, shard: Shard) -> Path:
        return self.dir / f"{shard.name}.done"

    def mark_done(self) -> None:
        self._done_path(self.shard).write_text("done\n")

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.shard.count) if not self._done_path(Shard(i, self.shard.count)).exists()]

    def take_merge(self) -> bool:
        """True for exactly one caller once every shard is done: that caller writes the output. A lock left
        by a merging process that died (same host, its pid gone) is taken over, so a rerun finishes the job."""
        if self.pending_shards():
            return False
        lock = self.dir / "merge.lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _stale(lock):
                    return False
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            return True
        return False

    def all_results(self) -> dict[int, dict]:
        """Every shard's results, by input index (for the merge)."""
        merged: dict[int, dict] = {}
        for path in sorted(self.dir.glob(f"shard-*-of-{self.shard.count:05d}.jsonl")):
            merged.update(self._read(path))
        return merged

    def remove(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


def _stale(lock: Path) -> bool:
    """Whether ``lock`` was taken by a process of this host that no longer exists."""
    try:
        host, pid = lock.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def owned(records: Iterable, shard: Shard, done: dict[int, dict]) -> Iterator:
    """The records this shard still has to do."""
    for r in records:
        if shard.owns(r.index) and r.index not in done:
            yield r


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------- the record loop
@dataclass(frozen=True)
class JobSpec:
    """What :func:`run_records` needs to know about a job: where, which shard, its parameters, how to
    read the input and how to process one batch of records into result dicts (each with ``index`` and
    ``status`` "ok"/"failed")."""

    name: str
    input: str
    out: Path
    shard: Shard
    params: dict
    read: Callable[[], Iterable]
    process: Callable[[list], list]
    batch_size: int
    overwrite: bool = False
    progress: bool = True
    tally: Callable[[list], dict] | None = None     # counts one batch adds to the progress bar (summed as it goes)
    count: int | None = None                         # how many records ``read`` yields, when ``input`` cannot say


def input_params(input, *, layout: str, columns: dict | None, split: str | None, images: str | None) -> dict:
    """The job parameters that say which records a job reads (part of every job's ``job.json``)."""
    return {"input": str(Path(input).resolve()), "layout": layout, "columns": columns, "split": split,
            "images": str(Path(images).resolve()) if images else None}


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ValueError(f"out: expected a .jsonl or .parquet path, got {out}")
    if out.exists() and not out.with_name(out.name + ".work").exists() and not overwrite:
        raise JobError(f"{out} exists (a finished job): pass overwrite=True / --overwrite to redo it")
    return out


def run_records(spec: JobSpec) -> WorkDir | None:
    """Process this shard's unfinished records batch by batch, appending results durably; then mark the
    shard done. Returns the work directory when this process is the one to merge, else None."""
    import sys

    from tqdm.auto import tqdm

    from .data import count_records

    work = WorkDir(spec.out, spec.shard, spec.params)
    done = work.load()
    total = spec.count if spec.count is not None else count_records(spec.input)
    todo = None if total is None else len(range(spec.shard.index, total, spec.shard.count)) - len(done)
    desc = spec.name + (f" {spec.shard.index}/{spec.shard.count}" if spec.shard.count > 1 else "")
    bar = tqdm(total=todo, unit="pair", desc=desc, disable=not spec.progress, dynamic_ncols=True, file=sys.stderr)
    counts: Counter = Counter()
    try:
        for batch in batched(owned(spec.read(), spec.shard, done), spec.batch_size):
            results = spec.process(batch)
            work.append(results)
            bar.update(len(batch))
            counts["failed"] += sum(r["status"] == "failed" for r in results)
            counts.update(spec.tally(results) if spec.tally else {})
            bar.set_postfix(counts, refresh=False)
    finally:
        bar.close()
    work.mark_done()
    if work.take_merge():
        return work
    print(f"{spec.name}: shard {spec.shard.index}/{spec.shard.count} done; waiting for shards "
          f"{work.pending_shards()} (the last one to finish writes the output)", file=sys.stderr)
    return None


def failure(index: int, line: int | None, rid, message: str) -> dict:
    return {"index": index, "status": "failed", "id": rid, "line": line, "error": message}


def prepare(batch: list, fn: Callable) -> tuple[list[dict], list, list]:
    """(failure results, records, ``fn(record)`` of each): a batch's unreadable records (``RecordError``) and
    those for which ``fn`` raises ValueError become failure results with the reason; the others go on."""
    from .data import RecordError

    failures, records, prepared = [], [], []
    for rec in batch:
        if isinstance(rec, RecordError):
            failures.append(failure(rec.index, rec.line, rec.id, rec.message))
            continue
        try:
            prepared.append(fn(rec))
            records.append(rec)
        except ValueError as e:
            failures.append(failure(rec.index, rec.line, rec.id, str(e)))
    return failures, records, prepared


def join_results(records: Iterable, results: dict[int, dict], work: WorkDir):
    """Pair every input record with its result, in input order: yields (record, result); checks that
    every record has exactly one."""
    count = 0
    for rec in records:
        count += 1
        res = results.get(rec.index)
        if res is None:
            raise JobError(f"{work.dir}: no result for record {rec.index} (was the input changed during the job?)")
        yield rec, res
    if len(results) != count:
        raise JobError(f"{work.dir}: {len(results)} results for {count} input records")


def write_rows(out: Path, rows: list[dict]) -> None:
    """The final output, atomically: JSONL, or parquet when ``out`` ends with .parquet."""
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        atomic_write_bytes(out, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
    else:
        atomic_write(out, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_failed(out: Path, failures: list[dict]) -> str | None:
    """``OUT.failed.jsonl`` with index, id, line and reason of every skipped record (removed when none)."""
    path = out.with_name(out.stem + ".failed.jsonl")
    if failures:
        atomic_write(path, lambda f: f.writelines(
            json.dumps({k: x.get(k) for k in ("index", "id", "line", "error")}) + "\n" for x in failures))
        return str(path)
    if path.exists():
        path.unlink()
    return None


def stop_if_strict(results: list[dict], strict: bool) -> None:
    """With ``strict``, the first failed record of a batch stops the job (naming the record)."""
    failed = [r for r in results if r["status"] == "failed"]
    if strict and failed:
        from .data import where

        first = min(failed, key=lambda r: r["index"])
        raise JobError(f"strict: {where(first['index'], first['line'], first['id'])}: {first['error']}")
