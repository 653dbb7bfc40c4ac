"""Store local text rows as a TFDS dataset (``array_record``) and read them back, without TF.

Findings with tensorflow-datasets 4.9.10 and tensorflow NOT installed:

* ``tfds.dataset_builders.store_as_tfds_dataset`` does NOT work: its ``AdhocBuilder`` checks
  ``isinstance(dataset, tf.data.Dataset)`` in ``_split_generators``, which imports tensorflow
  (``ModuleNotFoundError: No module named 'tensorflow'``).
* A small ``tfds.core.GeneratorBasedBuilder`` subclass over local files DOES work with
  ``file_format="array_record"`` (the ``array_record`` package is already a tfds dependency
  on Linux): ``download_and_prepare`` writes the shards and ``tfds.builder_from_directory``
  + ``as_data_source`` reads them back as Python dicts (text fields come back as ``bytes``).
* One tfds bug has to be side-stepped: ``DatasetBuilder.code_path`` lazily imports the
  ``importlib_resources`` backport (only declared for Python < 3.9) and fails without it. The
  builder below sets ``code_path = None`` (it only locates download checksums, which a
  local-file builder has none of), so no extra package is needed.

Tensorflow itself is never imported (the tests assert it stays out of ``sys.modules``).
tfds is imported lazily, so the rest of the tasks layer does not pay its import time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BUILDER_VERSION = "1.0.0"


@functools.cache
def _builder_class(name: str) -> type:
    """A TFDS builder class named ``name`` over rows given at construction (not registered)."""
    import tensorflow_datasets as tfds

    # mypy checks class keywords against object.__init_subclass__ when the base is untyped (Any)
    class _LocalRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
        VERSION = tfds.core.Version(BUILDER_VERSION)
        code_path = None  # see module docstring (importlib_resources bug)

        def __init__(
            self, *, rows: Mapping[str, Sequence[Mapping[str, str]]], fields: Sequence[str], **kwargs: Any
        ) -> None:
            self._rows = rows
            self._fields = tuple(fields)
            super().__init__(**kwargs)

        def _info(self) -> Any:
            features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in self._fields})
            return self.dataset_info_from_configs(features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager: Any) -> Any:
            return {split: self._generate_examples(split) for split in self._rows}

        def _generate_examples(self, split: str) -> Any:
            for i, row in enumerate(self._rows[split]):
                yield i, {k: row[k] for k in self._fields}

    _LocalRows.name = name
    _LocalRows.__name__ = _LocalRows.__qualname__ = name
    return _LocalRows


def write_text_dataset(
    name: str,
    rows: Mapping[str, Sequence[Mapping[str, str]]],
    fields: Sequence[str],
    data_dir: str | Path,
) -> Path:
    """Write ``{split: rows}`` of string fields as TFDS array_record; returns the version dir."""
    import tensorflow_datasets as tfds

    builder = _builder_class(name)(rows=rows, fields=fields, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(  # regenerate: never silently keep older rows
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,
            download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD,
        )
    )
    return Path(builder.data_dir)


def find_tfds_dir(path: str | Path) -> Path | None:
    """The TFDS version directory at or right below ``path`` (holding dataset_info.json)."""
    p = Path(path)
    if (p / "dataset_info.json").is_file():
        return p
    if p.is_dir():
        found = sorted(p.glob("*/dataset_info.json")) or sorted(p.glob("*/*/dataset_info.json"))
        if found:
            return found[-1].parent
    return None


def read_text_dataset(version_dir: str | Path, split: str) -> list[dict[str, str]]:
    """Rows of ``split`` from a TFDS directory written by ``write_text_dataset``."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(version_dir))
    if split not in builder.info.splits:
        raise FileNotFoundError(f"{version_dir}: no split {split!r} (splits: {sorted(builder.info.splits)})")
    source = builder.as_data_source(split=split)
    return [{k: _text(v) for k, v in source[i].items()} for i in range(len(source))]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
