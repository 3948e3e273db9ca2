"""Small I/O helpers shared by every program: atomic writes and content hashes.

Every file this project writes that a later run reads (shards, manifests, checkpoints, reports,
JSONL logs) goes through `atomic_write_*`: write to a temp file in the same directory, fsync,
then `os.replace`, so a killed job never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the final file the usual umask-based mode so that
        # shards, manifests and checkpoints are readable by the rest of a shared cluster group.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory next to `path`; on success it replaces `path` (an existing one is
    swapped out and deleted), on error it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(text: str) -> int:
    """A process-independent 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it: a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a killed writer; a missing file is empty.

    A malformed line before the last is a ValueError naming the file and line. Callers that must
    say what was dropped use `read_jsonl_checked`.
    """
    if not Path(path).exists():
        return []
    return read_jsonl_checked(path).records


@dataclass
class JsonlContents:
    """What `read_jsonl_checked` read from a JSONL file, and what it dropped."""

    records: list = field(default_factory=list)
    line_numbers: list[int] = field(default_factory=list)  # 1-based line of each record
    torn_line: Optional[int] = None  # 1-based line of a torn last line (dropped), else None
    torn_offset: Optional[int] = None  # byte offset where that line starts
    ends_with_newline: bool = True  # False: the last complete line lacks its "\n" (or the file is torn)


def read_jsonl_checked(path: str | os.PathLike) -> JsonlContents:
    """Read a JSONL file (lines end at "\n"; blank lines are skipped) and report what was dropped.

    The last non-blank line, if it is not valid JSON (or not UTF-8), is a torn record of a writer
    killed mid-line: it is dropped and its number returned in `torn_line`. Any other malformed line
    is a ValueError naming the file and the line. A missing file is a FileNotFoundError.
    """
    data = Path(path).read_bytes()
    out = JsonlContents(ends_with_newline=not data or data.endswith(b"\n"))
    lines = data.split(b"\n")
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    offset = 0
    for i, raw in enumerate(lines):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == last:
                out.torn_line, out.torn_offset = i + 1, start
                break
            what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e.msg})"
            raise ValueError(f"{path}: line {i + 1} is {what}") from None
        out.records.append(record)
        out.line_numbers.append(i + 1)
    return out


def repair_jsonl_tail(path: str | os.PathLike) -> Optional[int]:
    """Make a JSONL file that a killed writer left behind safe to append to.

    A torn last line is cut off (the records before it stay; its 1-based line number is returned),
    and a complete last line that lacks its newline gets one, so the next `append_jsonl` starts on
    a fresh line instead of gluing its record to the torn one. A missing file is left alone.
    """
    if not Path(path).exists():
        return None
    contents = read_jsonl_checked(path)
    if contents.torn_line is not None:
        os.truncate(path, contents.torn_offset)
    elif not contents.ends_with_newline:
        with open(path, "ab") as f:
            f.write(b"\n")
    return contents.torn_line
