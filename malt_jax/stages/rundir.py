"""The run directory: where every stage writes its outputs and the next stage reads them.

    <run>/config.yaml splits.json timings.json peak_rss_gb.json summary.json report.md
    <run>/expansion/batch_*.npz (+ .jsonl texts)     trees of G/V/R samples and leaf rewards
    <run>/credit/{G,V,R}_{sft,dpo}.jsonl summary.json per-role SFT examples and DPO pairs
    <run>/adapters/{G,V,R}[_sft].safetensors          one LoRA adapter per role (after DPO / SFT only),
                  training.json, {G,V,R}_epochs.jsonl (+ orbax checkpoints while training)
    <run>/eval/<system>.jsonl                         per-question rows of every evaluated system

Every file is written atomically (:func:`write_atomic`), and a stage writes the file that marks
its work as done last, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import RunConfig, to_dict
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import fetch
from malt_jax.roles import ROLES
from malt_jax.tasks import Example, Task

__all__ = [
    "write_atomic",
    "prepare_run_dir",
    "load_splits",
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


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Creates the run directory with the resolved config; refuses a directory of another config."""
    import yaml

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = run_dir / "config.yaml"
    h = cfg.hash()
    if stamp.exists():
        old = yaml.safe_load(stamp.read_text()) or {}
        if old.get("config_hash") != h:
            raise ValueError(
                f"{run_dir} holds a run with another config (hash {old.get('config_hash')}, this one "
                f"is {h}); use a new run_dir or delete the old one"
            )
    else:
        write_atomic(stamp, yaml.safe_dump({"config_hash": h, **to_dict(cfg)}, sort_keys=False))
    return run_dir


def load_splits(cfg: RunConfig, task: Task, run_dir: Path) -> tuple[list[Example], list[Example]]:
    """Seeded train/eval questions; the ids are written to ``splits.json`` in the run dir."""
    from malt_jax.tasks import train_eval_sets

    t = cfg.task
    opts = dict(t.options)
    train_split, eval_split = opts.pop("train_split", "train"), opts.pop("eval_split", "test")
    train, evals = train_eval_sets(task, t.num_train, t.num_eval, t.seed, train_split, eval_split)
    path = run_dir / "splits.json"
    if not path.exists():
        write_atomic(path, json.dumps({"seed": t.seed, "train": [e.id for e in train], "eval": [e.id for e in evals]}))
    return train, evals


def load_expansion(run_dir: Path) -> dict[str, np.ndarray]:
    """Every expansion batch of the run, concatenated along the question axis."""
    files = sorted((run_dir / "expansion").glob("batch_*[0-9].npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir / 'expansion'}: no expansion batches; run the expand stage first")
    parts = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def load_datasets(run_dir: Path, role: str, with_questions: bool = False) -> tuple:
    """A role's SFT examples and DPO pairs from the credit stage (``run_dir/credit``); with
    ``with_questions`` also the training-question index of each (for held-out splits)."""
    from malt_jax.training.data import DPOExample, SFTExample

    d = run_dir / "credit"

    def rows(kind):
        p = d / f"{role}_{kind}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the credit stage first")
        return read_jsonl(p)

    sft_rows, dpo_rows = rows("sft"), rows("dpo")
    sft = [SFTExample(prompt=r["prompt"], completion=r["completion"], weight=r.get("weight", 1.0)) for r in sft_rows]
    dpo = [
        DPOExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], weight=r.get("weight", 1.0))
        for r in dpo_rows
    ]
    if with_questions:
        return sft, dpo, [r["coord"][0] for r in sft_rows], [r["coords"][0][0] for r in dpo_rows]
    return sft, dpo


def save_adapter(adapter: Params, path: Path) -> None:
    """Writes an adapter as safetensors (flat ``layers.<name>.<a|b>`` keys); atomic."""
    from safetensors.numpy import save

    host = fetch(adapter["layers"])
    flat = {f"layers.{n}.{f}": host[n][f] for n in host for f in ("a", "b")}
    write_atomic(path, lambda f: f.write(save(flat)))


def load_adapter(path: Path) -> Params:
    """Reads an adapter written by :func:`save_adapter`."""
    from safetensors.numpy import load_file

    layers: dict[str, dict] = {}
    for k, v in load_file(str(path)).items():
        _, name, f = k.split(".")
        layers.setdefault(name, {})[f] = jnp.asarray(v)
    return {"layers": layers}


def training_counts(run_dir: Path) -> dict:
    """``adapters/training.json``: per role the example counts (held out, before / after caps)."""
    p = run_dir / "adapters" / "training.json"
    return json.loads(p.read_text()) if p.exists() else {}


def load_adapters(run_dir: Path) -> tuple[dict[str, Params] | None, dict[str, Params] | None]:
    """The roles' adapters after DPO and after SFT only (``None`` where a role's file is missing)."""
    d = run_dir / "adapters"

    def load(suffix: str) -> dict[str, Params] | None:
        paths = {r: d / f"{r}{suffix}.safetensors" for r in ROLES}
        if not all(p.exists() for p in paths.values()):
            return None
        return {r: load_adapter(p) for r, p in paths.items()}

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
    """The records of a jsonl file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Per-question rows as jsonl (atomic)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
