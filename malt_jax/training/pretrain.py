"""Pretraining from random initialisation (``malt-jax pretrain CONFIG``, :func:`pretrain`).

Full-parameter training of a Llama-family decoder (``model/llama.py``) with optax AdamW, on
packed rows of a corpus (``training/corpus.py``), writing a model directory that every other
command loads like a Hugging Face checkpoint (``config.json`` + ``model.safetensors`` +
``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML chat template)::

    <out_dir>/tokenizer.json, tokenizer_config.json   written first (trained on a corpus sample)
    <out_dir>/checkpoints/<step>/                    Orbax: params + optimizer state (resume)
    <out_dir>/pretrain_metrics.jsonl                 loss, grad norm, lr, tokens/s; held-out loss
    <out_dir>/tensorboard/pretrain/lm                the same under TRL's names (train/loss, eval/loss)
    <out_dir>/config.json, model.safetensors         the trained model (at the end)
    <out_dir>/pretrain_config.yaml, pretrain.json    the resolved config; the summary (written last)

Data: row ``g`` of the training stream packs the documents ``g * K, g * K + 1, ...`` (each followed
by ``<|endoftext|>``) into ``seq_len + 1`` tokens, ``K`` fixed from the corpus's first documents;
step ``s`` trains on rows ``s * batch_size ...``. The batch is a pure function of the step, so a
run resumed from its latest checkpoint computes bitwise the same parameters as one never stopped
(the checkpoint holds params, optimizer state and step). Attention runs causally over the whole
packed row (documents separated by ``<|endoftext|>``, GPT-2 style).

The same code runs sharded: with a mesh (``mesh`` in the config, or several devices) the
parameters and optimizer state are split as ``parallel/sharding.py`` says and the batch over
``data`` x ``fsdp``.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from malt_jax.config import ConfigError, ModelConfig
from malt_jax.model import llama
from malt_jax.model.tokenizer import Tokenizer, load_tokenizer
from malt_jax.training.corpus import Corpus, get_corpus
from malt_jax.training.pretrain_config import PretrainConfig, PretrainTrainConfig, pretrain_config_dict

__all__ = ["pretrain", "Packer", "make_pretrain_optimizer", "lm_loss", "STAGE"]

STAGE = "lm"  # the TensorBoard / metrics stage name
METRICS = "pretrain_metrics.jsonl"
SUMMARY = "pretrain.json"


# ----------------------------------------------------------------------------------------------
# data


class Packer:
    """Packs a corpus's documents into rows of ``seq_len + 1`` token ids, deterministically."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, seq_len: int, probe_docs: int = 64) -> None:
        self.corpus, self.tokenizer, self.width = corpus, tokenizer, seq_len + 1
        eot = tokenizer.backend.token_to_id("<|endoftext|>")
        eot = tokenizer.eos_id if eot is None else eot
        if eot is None:
            raise ValueError(
                f"{tokenizer.source}: the tokenizer has no <|endoftext|> or eos token to separate documents"
            )
        self.eot: int = eot
        lengths = [len(ids) for ids in self._encode(corpus.documents("train", 0, probe_docs))]
        mean = max(1.0, sum(lengths) / max(len(lengths), 1))
        self.docs_per_row = max(1, math.ceil(self.width / mean))

    def _encode(self, docs: list[str]) -> list[list[int]]:
        # trusted corpus text: control-token strings (<|im_start|> of ChatML traces) become their ids
        return [e.ids + [self.eot] for e in self.tokenizer.backend.encode_batch(docs, add_special_tokens=False)]

    def row(self, split: str, index: int) -> np.ndarray:
        k = self.docs_per_row
        start, out = index * k, list[int]()
        while len(out) < self.width:
            for ids in self._encode(self.corpus.documents(split, start, k)):
                out.extend(ids)
            start += k
        return np.asarray(out[: self.width], np.int32)

    def batch(self, split: str, step: int, batch_size: int) -> np.ndarray:
        """``[batch_size, seq_len + 1]`` ids: rows ``step * batch_size ...`` of ``split``."""
        return np.stack([self.row(split, step * batch_size + r) for r in range(batch_size)])


# ----------------------------------------------------------------------------------------------
# model, loss, optimizer


def lm_loss(params: llama.Params, rows: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Mean next-token cross-entropy of ``rows`` ``[B, T + 1]`` (inputs ``[:, :-1]``)."""
    x, y = rows[:, :-1], rows[:, 1:]
    logits, _ = llama.forward(params, x, llama.causal_positions(*x.shape), cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def _decay_mask(params: llama.Params) -> Any:
    """Weight decay on matrices (projections, embedding, LM head), not on norms and biases."""
    return {
        k: ({n: n in llama.LAYER_WEIGHTS for n in v} if k == "layers" else k in ("embed", "lm_head"))
        for k, v in params.items()
    }


def make_pretrain_optimizer(t: PretrainTrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping + AdamW (b2 0.95, decay on matrices) with linear warmup from 0 over
    ``warmup_steps`` and cosine decay to ``min_lr_ratio * learning_rate`` at ``steps``."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=t.steps,
        end_value=t.learning_rate * t.min_lr_ratio,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=t.weight_decay, mask=_decay_mask),
    )
    return tx, schedule


def _opt_shardings(opt_abstract: Any, params: Any, param_sh: Any, mesh: Any) -> Any:
    """Shardings of the optimizer state: each moment like the parameter whose path ends its own."""
    from jax.sharding import NamedSharding, PartitionSpec

    from malt_jax.runtime.checkpoint import flatten_named

    by_name = {n: (s, np.shape(p)) for (n, p), (_, s) in zip(flatten_named(params)[0], flatten_named(param_sh)[0])}
    named, treedef = flatten_named(opt_abstract)
    out = []
    for name, leaf in named:
        parts = name.split("/")
        match = next(
            (
                by_name["/".join(parts[i:])][0]
                for i in range(len(parts))
                if "/".join(parts[i:]) in by_name and by_name["/".join(parts[i:])][1] == np.shape(leaf)
            ),
            None,
        )
        out.append(match or NamedSharding(mesh, PartitionSpec()))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------------------------
# tokenizer


def _resolve_tokenizer_path(path: str) -> Path:
    if path == "smollm2":
        from malt_jax.model.files import smollm2_gguf_path

        return smollm2_gguf_path()
    return Path(path)


def prepare_tokenizer(cfg: PretrainConfig, corpus: Corpus, out_dir: Path, write: bool = True) -> Tokenizer:
    """The run's tokenizer: ``out_dir``'s when it has one (resume), else trained on the corpus
    (or read from ``tokenizer.path``) and written there. Its vocabulary must be ``model.vocab_size``."""
    from malt_jax.model.small_tokenizer import train_tokenizer

    existing = out_dir / "tokenizer.json"
    if existing.is_file():
        tok, source = load_tokenizer(out_dir), existing
    elif cfg.tokenizer.kind == "file":
        source = _resolve_tokenizer_path(cfg.tokenizer.path)
        tok = load_tokenizer(source)
        source = source / "tokenizer.json" if source.is_dir() else source
        if tok.chat_template is None:
            raise ConfigError(f"tokenizer.path: {source} has no chat template (tokenizer_config.json chat_template)")
    else:
        docs = corpus.documents("train", 0, cfg.tokenizer.sample_docs)
        tok = train_tokenizer(docs, cfg.vocab_size, None, kind=cfg.tokenizer.kind)
        source = existing
    if tok.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size: expected the vocabulary size of the tokenizer {source} ({tok.vocab_size}), "
            f"got {cfg.vocab_size}"
        )
    if write and not existing.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tok.save(out_dir)
    return tok


# ----------------------------------------------------------------------------------------------
# records


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is lost anyway
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _finished(out_dir: Path, cfg: PretrainConfig) -> dict | None:
    path = out_dir / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if summary.get("config_hash") != cfg.hash():
        raise ConfigError(
            f"out_dir: {out_dir} already holds a model pretrained with another config "
            f"(hash {summary.get('config_hash')} != {cfg.hash()}); choose another out_dir or delete it"
        )
    if not ((out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()):
        return None
    return summary


def _make_mesh(cfg: PretrainConfig) -> Any:
    """The run's mesh: ``cfg.mesh`` (default every device on ``data``), or None (plain single-device
    jit) for one device. A mesh whose sizes are all given may use fewer than all devices (the
    first ones); a mesh of size 1 is one device."""
    from malt_jax.parallel.sharding import make_mesh

    sizes = dict(cfg.mesh)
    if (jax.device_count() == 1 and not sizes) or (sizes and math.prod(sizes.values()) == 1):
        return None
    if sizes and -1 not in sizes.values():
        return make_mesh(sizes, jax.devices()[: math.prod(sizes.values())])
    return make_mesh(sizes or None)


class _Compiled(NamedTuple):
    init: Callable[[int], tuple[Any, Any]]  # seed -> (params, opt_state), placed
    step: Callable[..., Any]  # (params, opt_state, rows) -> (params, opt_state, metrics); donates
    eval_loss: Callable[..., Any]  # (params, rows) -> loss
    place: Callable[[np.ndarray], Any]  # host rows -> device batch
    schedule: optax.Schedule


@functools.lru_cache(maxsize=8)
def _compiled(mcfg: ModelConfig, t: PretrainTrainConfig, mesh: Any) -> _Compiled:
    """The jitted functions of a (model, training, mesh) triple: built once per process, so runs
    of the same shapes (a resumed run, tests) compile once."""
    from malt_jax.parallel.distributed import put
    from malt_jax.parallel.sharding import batch_sharding, param_shardings

    tx, schedule = make_pretrain_optimizer(t)

    def step_fn(params: Any, opt_state: Any, rows: jax.Array) -> tuple[Any, Any, dict]:
        loss, grads = jax.value_and_grad(lm_loss)(params, rows, mcfg)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_fn(params: Any, rows: jax.Array) -> jax.Array:
        return lm_loss(params, rows, mcfg)

    if mesh is None:
        opt_init = jax.jit(tx.init)

        def init(seed: int) -> tuple[Any, Any]:
            # eagerly: jitting the initialiser compiles for seconds (a 1-device model fits anyway)
            params = llama.init_params(mcfg, jax.random.key(seed))
            return params, opt_init(params)

        return _Compiled(init, jax.jit(step_fn, donate_argnums=(0, 1)), jax.jit(eval_fn), jnp.asarray, schedule)

    from jax.sharding import NamedSharding, PartitionSpec

    abstract = llama.abstract_params(mcfg)
    p_sh = param_shardings(abstract, mesh)
    o_sh = _opt_shardings(jax.eval_shape(tx.init, abstract), abstract, p_sh, mesh)
    b_sh = batch_sharding(mesh, 2, (t.batch_size, t.seq_len + 1))
    rep = NamedSharding(mesh, PartitionSpec())
    init_params = jax.jit(lambda key: llama.init_params(mcfg, key), out_shardings=p_sh)  # born sharded
    opt_init = jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=o_sh)

    def init_sharded(seed: int) -> tuple[Any, Any]:
        params = init_params(jax.random.key(seed))
        return params, opt_init(params)

    return _Compiled(
        init_sharded,
        jax.jit(step_fn, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1)),
        jax.jit(eval_fn, in_shardings=(p_sh, b_sh), out_shardings=rep),
        lambda rows: put(rows, b_sh),
        schedule,
    )


# ----------------------------------------------------------------------------------------------


def pretrain(
    cfg: PretrainConfig,
    progress: bool = True,
    command: str = "",
    stop_after: int | None = None,
) -> dict:
    """Pretrains ``cfg.model`` from random initialisation and writes the model directory
    ``cfg.out_dir`` (see the module docstring); resumes from its latest checkpoint; returns the
    summary (also ``<out_dir>/pretrain.json``). A finished ``out_dir`` of the same config is not
    trained again (its summary is returned, with ``"skipped": True``).

    ``stop_after``: stop once that step is done, as if the process were killed there (the model
    directory is not finished); for tests of resumption.
    """
    import yaml
    from tqdm.auto import tqdm

    from malt_jax.model.weights import save_hf
    from malt_jax.parallel.distributed import fetch, is_lead
    from malt_jax.parallel.sharding import batch_shards, mesh_context
    from malt_jax.runtime import tblog
    from malt_jax.runtime.checkpoint import Checkpointer, CheckpointError
    from malt_jax.runtime.machine import machine_info

    t_start = time.perf_counter()
    out_dir = Path(cfg.out_dir)
    done = _finished(out_dir, cfg)
    if done is not None:
        return {**done, "skipped": True}
    lead = is_lead()
    t = cfg.train
    mcfg = cfg.model
    corpus = get_corpus(cfg.corpus.name, **dict(cfg.corpus.options))
    tok = prepare_tokenizer(cfg, corpus, out_dir, write=lead)
    packer = Packer(corpus, tok, t.seq_len)
    mesh = _make_mesh(cfg)
    if mesh is not None and t.batch_size % batch_shards(mesh):
        raise ConfigError(
            f"train.batch_size: expected a multiple of the mesh's {batch_shards(mesh)} batch shards "
            f"(data x fsdp), got {t.batch_size}"
        )
    if lead:
        (out_dir / "pretrain_config.yaml").write_text(
            yaml.safe_dump({**pretrain_config_dict(cfg), "config_hash": cfg.hash()}, sort_keys=False)
        )

    fns = _compiled(mcfg, t, mesh)
    schedule = fns.schedule
    with mesh_context(mesh):
        params, opt_state = fns.init(t.seed)
        train_step, eval_loss, place = fns.step, fns.eval_loss, fns.place

        # resume
        ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=2)
        start = 0
        if ckpt.latest_step() is not None:
            meta = ckpt.metadata()
            if meta.get("config_hash") != cfg.hash():
                raise CheckpointError(
                    f"{ckpt.directory}: written by another pretraining config (hash {meta.get('config_hash')} "
                    f"!= {cfg.hash()}); use a fresh out_dir or delete it"
                )
            state, meta = ckpt.restore({"params": params, "opt_state": opt_state})
            params, opt_state, start = state["params"], state["opt_state"], int(meta["step"])
        metrics_path = out_dir / METRICS
        rows = [r for r in _read_jsonl(metrics_path) if r.get("step", 0) <= start] if start else []
        if lead:
            _write_jsonl(metrics_path, rows)

        eval_batches = [packer.batch("validation", i, t.batch_size) for i in range(t.eval_batches)]

        def heldout() -> float:
            return float(np.mean([float(fetch(eval_loss(params, place(b)))) for b in eval_batches]))

        def record(new: list[dict]) -> None:
            rows.extend(new)
            if lead:
                with metrics_path.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)

        def mirror() -> None:
            if lead:
                tblog.write_training(
                    out_dir,
                    "pretrain",
                    [r for r in rows if r["kind"] == "train"],
                    [r for r in rows if r["kind"] == "eval"],
                )

        tokens_per_step = t.batch_size * t.seq_len
        if start == 0:
            record([{"kind": "eval", "stage": STAGE, "step": 0, "heldout/loss": heldout()}])
        bar = tqdm(total=t.steps, initial=start, desc=f"pretrain {cfg.name}", disable=not progress, dynamic_ncols=True)
        pending: list[tuple[int, dict]] = []
        # the last train loss so far: from the metrics on disk when resuming (a run killed after its
        # final checkpoint resumes with no step left to run)
        last_train = next((r["loss"] for r in reversed(rows) if r["kind"] == "train"), None)
        timed_tokens, timed_s, last_heldout = 0, 0.0, None
        t_timed = time.perf_counter()
        resumed_from = start

        def flush() -> None:
            nonlocal last_train
            if not pending:
                return
            nonlocal timed_tokens, timed_s
            vals = fetch([m for _, m in pending])  # waits for the steps
            if pending[-1][0] > start + 1:
                timed_tokens, timed_s = (pending[-1][0] - start - 1) * tokens_per_step, time.perf_counter() - t_timed
            new = []
            for (s, _), m in zip(pending, vals):
                row: dict[str, Any] = {
                    "kind": "train",
                    "stage": STAGE,
                    "step": s,
                    "loss": float(m["loss"]),
                    "grad_norm": float(m["grad_norm"]),
                    "learning_rate": float(schedule(np.int32(s - 1))),
                    "tokens_per_s": (timed_tokens / timed_s) if timed_s else None,
                }
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"pretrain: the training loss is {row['loss']} at step {s}")
                new.append(row)
            pending.clear()
            last_train = new[-1]["loss"]
            record(new)

        step = start
        try:
            while step < t.steps:
                batch = place(packer.batch("train", step, t.batch_size))
                params, opt_state, m = train_step(params, opt_state, batch)
                step += 1
                pending.append((step, m))
                if step == start + 1:  # the first step of a call compiles: time the others
                    jax.block_until_ready(m["loss"])
                    t_timed = time.perf_counter()
                boundary = step % t.eval_every == 0 or step % t.checkpoint_every == 0 or step == t.steps
                if len(pending) >= 10 or boundary or step == stop_after:
                    flush()
                if step % t.eval_every == 0 or step == t.steps:
                    last_heldout = heldout()
                    record([{"kind": "eval", "stage": STAGE, "step": step, "heldout/loss": last_heldout}])
                    mirror()
                if step % t.checkpoint_every == 0 or step == t.steps:
                    ckpt.save(
                        step, {"params": params, "opt_state": opt_state}, {"step": step, "config_hash": cfg.hash()}
                    )
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_train:.3f}" if last_train is not None else "-",
                    heldout=f"{last_heldout:.3f}" if last_heldout is not None else "-",
                    tok_s=f"{timed_tokens / timed_s:,.0f}" if timed_s else "-",
                )
                if stop_after is not None and step >= stop_after and step < t.steps:
                    flush()
                    return {"stopped_at": step, "out_dir": str(out_dir), "params": params}
        finally:
            bar.close()
            ckpt.close()
        flush()

    host_params = fetch(params)
    if lead:
        save_hf(host_params, mcfg, out_dir)
        mirror()
    evals = [r for r in rows if r["kind"] == "eval"]
    head = mcfg.vocab_size * mcfg.dim
    summary = {
        "name": cfg.name,
        "out_dir": str(out_dir),
        "config_hash": cfg.hash(),
        "steps": t.steps,
        "resumed_from": resumed_from,
        "tokens": t.steps * tokens_per_step,
        "train_loss": last_train,
        "heldout_loss": evals[-1]["heldout/loss"] if evals else None,
        "initial_heldout_loss": evals[0]["heldout/loss"] if evals else None,
        "tokens_per_s": (timed_tokens / timed_s) if timed_s else None,
        "wall_time_s": time.perf_counter() - t_start,
        "n_params": mcfg.n_params,
        "lm_head_share": head / mcfg.n_params,
        "vocab_size": mcfg.vocab_size,
        "tokenizer": cfg.tokenizer.kind,
        "docs_per_row": packer.docs_per_row,
        "mesh": None if mesh is None else dict(mesh.shape),
        "machine": machine_info(),
        "date": datetime.date.today().isoformat(),
        "command": command,
    }
    if tblog.available():
        summary["tensorboard"] = tblog.command(out_dir)
    if lead:
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
