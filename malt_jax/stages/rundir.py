"""The run directory: where every stage writes its outputs and the next stage reads them.

    <run>/config.yaml splits.json timings.json peak_rss_gb.json summary.json report.md
    <run>/expansion/batch_*.npz (+ .jsonl texts)     trees of G/V/R samples and leaf rewards
    <run>/credit/{G,V,R}_{sft,dpo}.jsonl summary.json per-role SFT examples and DPO pairs
    <run>/adapters/{G,V,R}[_sft].safetensors          one LoRA adapter per role (after DPO / SFT only;
                  G and R only without a critique, tree.critique: false),
                  training.json, {G,V,R}_epochs.jsonl (+ orbax checkpoints while training)
    <run>/eval/<system>.jsonl                         per-question rows of every evaluated system
    <run>/round_<r>/expansion|credit|adapters|eval    iterative MALT's rounds (workflows/iterate.py),
    <run>/validation.json iterate.json                its validation questions and per-round record

Every file is written atomically (:func:`write_atomic`), and a stage writes the file that marks
its work as done last, so an interrupted run resumes where it stopped.

One writer: ``malt-jax run``/``study`` and the single-stage commands hold :func:`lock_run_dir`
(an OS lock, ``fcntl.flock`` on ``<run>/.lock.<process index>``) while they work, so a second
process on the same run directory is refused at once; the kernel drops the lock when its process
dies, so a killed run never blocks its rerun. The processes of one multi-host run each lock their
own file (they write the same directory together by design). Readers (``ask``, ``export``) take
no lock: they read only finished files, every one written atomically, so a run working next to
them cannot show them a partial file.

What the directory trusts, and how it is checked (a failed check is one line naming the file):

* ``config.yaml`` holds the config the directory was made with and its ``config_hash``; it is
  verified against that hash wherever it is read (:func:`read_run_config`), and the config of a
  resumed run must have the same identity except ``run_dir`` (a moved or copied run resumes).
  Speed-only fields (``identity: False`` in :mod:`malt_jax.config`) may be edited: they do not
  change results. A directory holding outputs but no ``config.yaml`` adopts them under no config.
  The stamp is written only once the task and its data have loaded (:func:`stamp_run_dir`).
* ``splits.json`` must name the questions the config selects now (an edit, or changed data);
  so must ``validation.json`` (iterative MALT's validation questions).
* ``expansion/batch_*.npz``: readable, the same arrays in every batch, trees of the config's
  shape, questions 0..N-1 in order (the expand stage also checks them against the training set).
* ``credit/<role>_{sft,dpo}.jsonl``: valid rows, as many as ``credit/summary.json`` counts.
* ``adapters/training.json``, ``*.safetensors``: readable (a shape error would surface in use).
* ``eval/<system>.jsonl``: valid rows; a file without one row per question is evaluated again.
  Hand-edited values in a well-formed row (or adapter) are not detectable without the outputs
  being recomputed, which is what deleting the file does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import ConfigError, RunConfig, run_config_of, to_dict
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import fetch
from malt_jax.roles import ROLES, role_name
from malt_jax.tasks import Example, Task

__all__ = [
    "RunDirError",
    "RunDirBusy",
    "write_atomic",
    "lock_run_dir",
    "prepare_run_dir",
    "stamp_run_dir",
    "read_run_config",
    "read_json",
    "split_questions",
    "load_splits",
    "validation_questions",
    "load_validation",
    "load_expansion",
    "load_datasets",
    "save_adapter",
    "load_adapter",
    "load_adapters",
    "training_counts",
    "role_epochs",
    "read_rows",
    "write_rows",
]


def write_atomic(path: Path, content: str | Callable[[Any], Any]) -> None:
    """Writes ``content`` (text, or a function writing to a binary file) to ``path`` atomically:
    readers see the old file or the whole new one. The temporary name is unique per process, so
    the processes of a multi-host run may all write the same (identical) file."""
    tmp = path.with_name(f".{path.name}.{jax.process_index()}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            with open(tmp, "wb") as f:
                content(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunDirError(ValueError):
    """A run directory's file fails its check, or the directory belongs to another config."""


class RunDirBusy(RunDirError):
    """Another process is working on the run directory."""


_LOCKS: dict[tuple[int, int], list[int]] = {}  # (device, inode) of a lock file -> [fd, depth]


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Holds the run directory's writer lock (created with the directory) for the ``with`` block:
    a second process is refused at once (:class:`RunDirBusy`); a nested or repeated use in this
    process is allowed. ``fcntl.flock`` locks die with their process: no stale lock after a kill."""
    import fcntl

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f".lock.{jax.process_index()}"  # each process of a multi-host run: its own
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _LOCKS:  # this process holds it already (flock would refuse a second descriptor)
        os.close(fd)
        _LOCKS[key][1] += 1
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirBusy(
                f"{run_dir}: in use by another malt-jax process (pid {holder}, lock {path}); one run "
                f"directory takes one writer: wait for it to finish, or stop it and rerun"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _LOCKS[key] = [fd, 1]
    try:
        yield run_dir
    finally:
        held = _LOCKS[key]
        held[1] -= 1
        if held[1] == 0:
            del _LOCKS[key]
            os.close(held[0])  # releases the flock


# what a run writes next to config.yaml: files of this name in a directory without a config.yaml
# are outputs of a config nobody can name any more
_OUTPUTS = (
    "splits.json",
    "expansion",
    "credit",
    "adapters",
    "eval",
    "summary.json",
    "report.md",
    "timings.json",
    "peak_rss_gb.json",
    "rl",
    "validation.json",
    "iterate.json",
)


def _outputs(run_dir: Path) -> list[str]:
    # n0040/: a study's training-set size; round_2/: a round of iterative MALT
    return sorted(
        p.name
        for p in run_dir.iterdir()
        if p.name in _OUTPUTS or (p.is_dir() and re.fullmatch(r"n\d{4}|round_\d+", p.name))
    )


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was made with (``config.yaml``), verified against the
    ``config_hash`` recorded in it (``config.run_config_of``); errors as :class:`RunDirError`."""
    try:
        return run_config_of(run_dir)
    except ConfigError as e:
        raise RunDirError(str(e)) from None


def prepare_run_dir(cfg: RunConfig, stamp: bool = True) -> Path:
    """Creates the run directory; refuses a directory of another config (``config.yaml``
    verified, identity compared but for ``run_dir``, so a moved or copied run resumes) and one
    holding outputs without a ``config.yaml``. With ``stamp`` also records the config
    (:func:`stamp_run_dir`); a run stamps only once its task and data have loaded."""
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    # outputs before the stamp: a stamp is written before any output, so if another process of
    # a multi-host run wrote an output after the first look, the stamp is seen by the second
    outputs = _outputs(run_dir)
    if (run_dir / "config.yaml").exists():
        old = read_run_config(run_dir)
        h = cfg.hash()
        if dataclasses.replace(old, run_dir=cfg.run_dir).hash() != h:
            raise RunDirError(
                f"{run_dir} holds a run with another config (hash {old.hash()}, this one is {h}); "
                f"use a new run_dir or delete the old one"
            )
    elif outputs:
        raise RunDirError(
            f"{run_dir}: holds run outputs ({', '.join(outputs)}) but no config.yaml naming the config "
            f"they were made with, so they are not adopted; restore its config.yaml, or move them "
            f"away (or use a new run_dir) to start afresh"
        )
    if stamp:
        stamp_run_dir(cfg, run_dir)
    return run_dir


def stamp_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Writes ``config.yaml`` (the resolved config and its hash) unless the directory has one."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        write_atomic(path, yaml.safe_dump({"config_hash": cfg.hash(), **to_dict(cfg)}, sort_keys=False))


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file of the run directory (``default`` where it is missing); unreadable: one line."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if default is None:
            raise
        return default
    except (ValueError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e}); delete it to have it written again") from None


def split_questions(cfg: RunConfig, task: Task) -> tuple[list[Example], list[Example]]:
    """The config's seeded train/eval questions (nothing written)."""
    from malt_jax.tasks import train_eval_sets

    t = cfg.task
    opts = dict(t.options)
    train_split, eval_split = opts.pop("train_split", "train"), opts.pop("eval_split", "test")
    return train_eval_sets(task, t.num_train, t.num_eval, t.seed, train_split, eval_split)


def validation_questions(
    cfg: RunConfig,
    task: Task,
    train: list[Example],
    evals: list[Example],
    n: int,
    split: str = "validation",
    field: str = "iterate.val_questions",
) -> list[Example]:
    """``n`` seeded (``task.seed``) questions of the task's ``split`` that are neither training nor
    evaluation questions (compared on :func:`~malt_jax.tasks.question_key`, so also when
    ``split`` is the evaluation split itself, or all splits load one file); nothing written. A
    task without that split, or with too few such questions, is a ConfigError naming ``field``
    (the config key that asked for ``n``)."""
    from malt_jax.tasks.base import question_key, split_examples

    try:
        pool = task.load(split)
    except (ValueError, OSError, KeyError) as e:  # no such split / file
        raise ConfigError(
            f"{field}: task {cfg.task.name!r} has no {split!r} split to draw validation "
            f"questions from ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    used = {question_key(e.question) for e in [*train, *evals]}
    pool = [e for e in pool if question_key(e.question) not in used]
    if len(pool) < n:
        raise ConfigError(
            f"{field}: {n} asked, but the {split!r} split of task {cfg.task.name!r} has only "
            f"{len(pool)} question(s) that are neither training nor evaluation questions"
        )
    return split_examples(pool, 0, n, cfg.task.seed)[1]


def load_validation(cfg: RunConfig, run_dir: Path, questions: list[Example]) -> list[Example]:
    """Records the validation questions' ids in ``validation.json`` (first call) or checks them
    against the ids found there, as :func:`load_splits` does for the training / evaluation ids."""
    path = run_dir / "validation.json"
    record = {"seed": cfg.task.seed, "validation": [e.id for e in questions]}
    record = json.loads(json.dumps(record))
    if path.exists():
        old = read_json(path)
        if not isinstance(old, dict) or any(old.get(k) != v for k, v in record.items()):
            raise RunDirError(
                f"{path}: its validation questions are not those this config selects from the task's data "
                f"(the file was edited, or the data changed); the run's outputs belong to the recorded questions"
            )
    else:
        write_atomic(path, json.dumps(record))
    return questions


def load_splits(
    cfg: RunConfig, task: Task, run_dir: Path, split: tuple[list[Example], list[Example]] | None = None
) -> tuple[list[Example], list[Example]]:
    """Seeded train/eval questions (``split``: already drawn by :func:`split_questions`); the
    ids are written to ``splits.json`` in the run dir, and must match the ids found there."""
    train, evals = split or split_questions(cfg, task)
    path = run_dir / "splits.json"
    ids = {"seed": cfg.task.seed, "train": [e.id for e in train], "eval": [e.id for e in evals]}
    record = json.loads(json.dumps(ids))  # as read back from the file
    if path.exists():
        old = read_json(path)
        if not isinstance(old, dict) or any(old.get(k) != v for k, v in record.items()):
            diff = next((k for k in record if not isinstance(old, dict) or old.get(k) != record[k]), "?")
            raise RunDirError(
                f"{path}: its {diff!r} questions are not those this config selects from the task's data "
                f"(the file was edited, or the data changed); the run's outputs belong to the recorded questions"
            )
    else:
        write_atomic(path, json.dumps(record))
    return train, evals


def load_expansion(run_dir: Path) -> dict[str, np.ndarray]:
    """Every expansion batch of the run, concatenated along the question axis."""
    files = sorted((run_dir / "expansion").glob("batch_*[0-9].npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir / 'expansion'}: no expansion batches; run the expand stage first")
    parts = []
    for f in files:
        try:
            with np.load(f) as z:
                parts.append({k: z[k] for k in z.files})
        except Exception as e:  # a truncated or foreign file: zipfile/pickle/OS errors
            raise RunDirError(f"{f}: unreadable expansion batch ({type(e).__name__}: {e}); delete it to redo") from None
        shapes = {k: v.shape[1:] for k, v in parts[-1].items()}
        first = {k: v.shape[1:] for k, v in parts[0].items()}
        if shapes != first or "index" not in shapes or "rewards" not in shapes:
            raise RunDirError(
                f"{f}: its arrays ({sorted(shapes.items())}) are not those of {files[0].name} "
                f"({sorted(first.items())}); the batches come from different runs: delete {run_dir / 'expansion'}"
            )
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not np.array_equal(out["index"], np.arange(len(out["index"]))):
        raise RunDirError(
            f"{run_dir / 'expansion'}: the batches hold questions {out['index'].tolist()[:8]}... not 0..N-1 "
            f"in order (a batch was removed, renamed or copied in); delete the directory to redo the expansion"
        )
    return out


def load_datasets(run_dir: Path, role: str, with_questions: bool = False) -> tuple:
    """A role's SFT examples and DPO pairs from the credit stage (``run_dir/credit``); with
    ``with_questions`` also the training-question index of each (for held-out splits)."""
    from malt_jax.training.data import DPOExample, SFTExample

    d = run_dir / "credit"
    counts = read_json(d / "summary.json", {})

    def rows(kind: str, count_key: str) -> tuple[Path, list[dict]]:
        p = d / f"{role}_{kind}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the credit stage first")
        out = read_jsonl(p)
        n = counts.get(f"{role_name(role)}/{count_key}")
        if n is not None and n != len(out):
            raise RunDirError(
                f"{p}: {len(out)} rows, {d / 'summary.json'} counts {n} (the file was cut or edited); "
                f"delete {d} to redo the credit stage"
            )
        return p, out

    (sft_path, sft_rows), (dpo_path, dpo_rows) = rows("sft", "sft"), rows("dpo", "dpo_pairs")
    try:
        sft = [
            SFTExample(prompt=r["prompt"], completion=r["completion"], weight=r.get("weight", 1.0)) for r in sft_rows
        ]
        sft_q = [r["coord"][0] for r in sft_rows]
    except (KeyError, TypeError, IndexError) as e:
        raise RunDirError(f"{sft_path}: a row lacks {e} (not a credit-stage SFT row)") from None
    try:
        dpo = [
            DPOExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], weight=r.get("weight", 1.0))
            for r in dpo_rows
        ]
        dpo_q = [r["coords"][0][0] for r in dpo_rows]
    except (KeyError, TypeError, IndexError) as e:
        raise RunDirError(f"{dpo_path}: a row lacks {e} (not a credit-stage DPO pair)") from None
    if with_questions:
        return sft, dpo, sft_q, dpo_q
    return sft, dpo


def save_adapter(adapter: Params, path: Path) -> None:
    """Writes an adapter as safetensors (flat ``layers.<name>.<a|b>`` keys); atomic."""
    from safetensors.numpy import save

    host = fetch(adapter["layers"])
    flat = {f"layers.{n}.{f}": host[n][f] for n in host for f in ("a", "b")}
    write_atomic(path, lambda f: f.write(save(flat)))


def load_adapter(path: Path, cfg: RunConfig | None = None) -> Params:
    """Reads an adapter written by :func:`save_adapter`, checked against the adapter that ``cfg``
    (default: the ``config.yaml`` of the run directory holding ``path``'s ``adapters/``, where
    there is one) defines (``model.lora.abstract_adapter``): its keys, shapes and dtypes. Raises
    WeightError naming the file and the tensor, before any of it is used."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from malt_jax.model.lora import abstract_adapter
    from malt_jax.model.weights import WeightError

    path = Path(path)
    if cfg is None and path.parent.name == "adapters" and (path.parent.parent / "config.yaml").is_file():
        cfg = run_config_of(path.parent.parent)
    if not path.is_file():
        raise WeightError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightError(f"{path}: not a readable safetensors adapter ({str(e).splitlines()[0]})") from None
    expected = None if cfg is None else abstract_adapter(cfg.model, cfg.lora)["layers"]
    layers = _adapter_layers(path, tensors, expected)
    return {"layers": {n: {f: jnp.asarray(v) for f, v in ab.items()} for n, ab in layers.items()}}


def _adapter_layers(path: Path, tensors: dict[str, np.ndarray], expected: dict | None) -> dict[str, dict]:
    """``layers.<name>.<a|b>`` tensors as ``{name: {"a", "b"}}``, checked (see :func:`load_adapter`):
    float32, ``a`` [k, in, r] and ``b`` [k, r, out] with one k and r, finite, and where
    ``expected`` (``abstract_adapter(...)["layers"]``) is given, its names, shapes and dtypes."""
    from malt_jax.model.llama import LAYER_WEIGHTS
    from malt_jax.model.weights import WeightError

    layers: dict[str, dict[str, np.ndarray]] = {}
    for k, v in tensors.items():
        parts = k.split(".")
        if len(parts) != 3 or parts[0] != "layers" or parts[1] not in LAYER_WEIGHTS or parts[2] not in ("a", "b"):
            raise WeightError(
                f"{path}: tensor {k!r} is not an adapter weight (layers.<{'|'.join(LAYER_WEIGHTS)}>.<a|b>)"
            )
        layers.setdefault(parts[1], {})[parts[2]] = v
    if not layers:
        raise WeightError(f"{path}: no adapter tensors")
    ks, rs = set(), set()
    for name, ab in layers.items():
        if set(ab) != {"a", "b"}:
            raise WeightError(f"{path}: tensor 'layers.{name}.{'b' if 'a' in ab else 'a'}' is missing")
        a, b = ab["a"], ab["b"]
        for f, x in (("a", a), ("b", b)):
            if x.dtype != np.float32:
                raise WeightError(f"{path}: tensor 'layers.{name}.{f}' has dtype {x.dtype}, expected float32")
            if x.ndim != 3:
                raise WeightError(f"{path}: tensor 'layers.{name}.{f}' has shape {list(x.shape)}, expected 3 dims")
            if not np.isfinite(x).all():
                raise WeightError(f"{path}: tensor 'layers.{name}.{f}' has non-finite values")
        if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
            raise WeightError(
                f"{path}: layers.{name}: a {list(a.shape)} and b {list(b.shape)} do not chain "
                "(expected a [layers, in, rank], b [layers, rank, out])"
            )
        ks.add(a.shape[0])
        rs.add(a.shape[2])
    if len(ks) > 1 or len(rs) > 1:
        raise WeightError(f"{path}: the adapted weights differ in layer count {sorted(ks)} or rank {sorted(rs)}")
    if expected is not None:
        for name in expected:
            if name not in layers:
                raise WeightError(f"{path}: tensor 'layers.{name}.a' is missing (the run's lora.targets name {name})")
        for name, ab in layers.items():
            if name not in expected:
                raise WeightError(f"{path}: tensor 'layers.{name}.a' is not in the run's lora.targets")
            for f, x in ab.items():
                want = expected[name][f]
                if tuple(x.shape) != tuple(want.shape):
                    raise WeightError(
                        f"{path}: tensor 'layers.{name}.{f}' has shape {list(x.shape)}, the run's model and "
                        f"lora config need {list(want.shape)}"
                    )
    return layers


def training_counts(run_dir: Path) -> dict:
    """``adapters/training.json``: per role the example counts (held out, before / after caps)."""
    counts = read_json(run_dir / "adapters" / "training.json", {})
    if not isinstance(counts, dict):
        raise RunDirError(f"{run_dir / 'adapters' / 'training.json'}: not a mapping of role -> counts")
    return counts


def load_adapters(run_dir: Path) -> tuple[dict[str, Params] | None, dict[str, Params] | None]:
    """The roles' adapters after DPO and after SFT only (``None`` where a role's file is missing),
    each checked against the run's config (read and verified once, where ``config.yaml`` exists).
    The roles are those the run trains (``TreeConfig.roles``: G and R only for a run without a
    critique, ``tree.critique: false``; all three without a ``config.yaml``)."""
    d = run_dir / "adapters"
    cfg = run_config_of(run_dir) if (run_dir / "config.yaml").is_file() else None
    roles = ROLES if cfg is None else cfg.tree.roles

    def load(suffix: str) -> dict[str, Params] | None:
        paths = {r: d / f"{r}{suffix}.safetensors" for r in roles}
        if not all(p.exists() for p in paths.values()):
            return None
        out = {}
        for r, p in paths.items():
            try:
                out[r] = load_adapter(p, cfg)
            except Exception as e:  # safetensors' header / size checks, a foreign key layout
                raise RunDirError(f"{p}: unreadable adapter ({type(e).__name__}: {e})") from None
        return out

    return load(""), load("_sft")


def role_epochs(run_dir: Path) -> dict[str, list[dict]]:
    """Per role the per-epoch training records (``adapters/<role>_epochs.jsonl``) of the roles trained."""
    epochs = {}
    for r in ROLES:
        p = run_dir / "adapters" / f"{r}_epochs.jsonl"
        if p.exists():
            epochs[r] = read_jsonl(p)
    return epochs


def read_rows(path: Path, n: int) -> list[dict] | None:
    """An evaluated system's rows, or None unless the file holds all ``n`` of them."""
    if path.exists():
        rows = read_jsonl(path)
        if len(rows) == n:
            return rows
    return None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file (blank lines skipped); a line that is not JSON: one line
    naming the file and line."""
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise RunDirError(f"{path}:{i}: not valid JSON ({e}); delete the file to have it rewritten") from None
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """Per-question rows as jsonl (atomic)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
