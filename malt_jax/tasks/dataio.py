"""Local data files: split resolution and row reading with file/line error attribution.

A task's ``path`` may be a single file (used for every split, to be divided with
``split_examples``) or a directory holding one file per split (``train.jsonl``,
``test.jsonl``, ``dev_rand_split.jsonl``, ...). Row parsers raise ``RowError``; the readers
turn it into ``DataError`` naming the file and line, or skip and count the row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from malt_jax.tasks.base import DataError, Example, LoadResult, check_on_error

# Words that may name a split inside a file name.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "test": ("test",),
    "validation": ("validation", "valid", "val", "dev"),
}

RowParser = Callable[[Mapping[str, Any], str], Example]  # (row, row_id) -> Example


class RowError(ValueError):
    """A row is malformed; the reader adds the file and line."""


def require(row: Mapping[str, Any], key: str, kind: type = str) -> Any:
    """``row[key]``, which must exist and be of ``kind``."""
    if not isinstance(row, Mapping):
        raise RowError(f"row must be a JSON object, got {type(row).__name__}")
    if key not in row:
        raise RowError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        raise RowError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _split_words(name: str) -> set[str]:
    return set(name.lower().replace("-", "_").replace(".", "_").split("_"))


def resolve_split_file(path: str | Path, split: str, suffixes: tuple[str, ...]) -> Path:
    """The file holding ``split``: ``path`` itself if a file, else a matching file inside it."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"data path {p} does not exist")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(suffixes))
    exact = [f for f in files if f.name in {split + s for s in suffixes}]
    if exact:
        return exact[0]
    aliases = SPLIT_ALIASES.get(split, (split,))
    matches = [f for f in files if _split_words(f.name) & set(aliases)]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(f.name for f in files) or "none"
    why = "several files match" if matches else "no file matches"
    raise FileNotFoundError(f"{p}: {why} split {split!r} (files: {listing})")


def read_jsonl(path: str | Path, parse: RowParser, on_error: str = "raise") -> LoadResult:
    """Parse each non-blank line of a JSON-lines file with ``parse``."""
    check_on_error(on_error)
    result = LoadResult(examples=[])
    stem = Path(path).stem
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = _decode(raw)
                if not line.strip():
                    continue
                example = parse(_loads(line), f"{stem}-{lineno}")
            except RowError as e:
                _row_error(result, DataError(path, lineno, str(e)), on_error)
                continue
            result.examples.append(example)
    return result


def _row_error(result: LoadResult, err: DataError, on_error: str) -> None:
    """Raise ``err`` (on_error="raise") or count it as a skipped row."""
    if on_error == "raise":
        raise err from None
    result.add_error(err)


def iter_json_files(root: str | Path) -> Iterator[Path]:
    """``*.json`` files under ``root`` (recursively), in a stable sorted order."""
    yield from sorted(Path(root).rglob("*.json"))


def read_json_files(root: str | Path, parse: RowParser, on_error: str = "raise") -> LoadResult:
    """Parse one JSON object per file (e.g. the original MATH layout); ids are relative paths."""
    check_on_error(on_error)
    result = LoadResult(examples=[])
    base = Path(root)
    for file in iter_json_files(root):
        try:
            text = _decode(file.read_bytes())
            example = parse(_loads(text), file.relative_to(base).with_suffix("").as_posix())
        except RowError as e:
            _row_error(result, DataError(file, getattr(e, "lineno", None), str(e)), on_error)
            continue
        result.examples.append(example)
    return result


def _decode(data: bytes) -> str:
    """UTF-8 text of ``data``; failures become ``RowError`` (keeping the line number in ``data``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        column = e.start - data.rfind(b"\n", 0, e.start)  # 1-based, in bytes
        err = RowError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} ({e.reason})")
        err.lineno = data.count(b"\n", 0, e.start) + 1  # type: ignore[attr-defined]
        raise err from None


def _loads(text: str) -> Any:
    """``json.loads`` whose failures become ``RowError`` (keeping the JSON line number)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        err = RowError(f"invalid JSON: {e.msg} (column {e.colno})")
        err.lineno = e.lineno  # type: ignore[attr-defined]
        raise err from None
