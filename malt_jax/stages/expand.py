"""Stage 1, trajectory expansion: G -> V -> R trees of samples for the training questions.

    <run>/expansion/batch_*.npz (+ .jsonl texts)   tokens, lengths, log-probs, stops and leaf rewards

:func:`sample_trees` is the host driver of the in-graph tree sampler (``expansion.expand``) that
evaluation and ``ask`` use too; :func:`run_expand` samples the training trees batch by batch
(resumable per batch) and grades their leaves (:func:`grade_leaves`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import RunConfig
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.model.tokenizer import Tokenizer
from malt_jax.parallel.distributed import fetch
from malt_jax.roles import ROLES
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.decode import pad_batch
from malt_jax.sampling.expansion import Contexts, ExpansionSpec, expand
from malt_jax.stages.rundir import write_atomic
from malt_jax.tasks import Example, Task

__all__ = ["question_keys", "sample_trees", "decode_level", "decode_tree", "grade_leaves", "run_expand"]


def question_keys(seed: int, indices: Sequence[int]) -> jax.Array:
    """Per-question keys that depend only on (seed, question index), not on batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def sample_trees(
    model: Model,
    codec: PromptCodec,
    examples: Sequence[Example],
    spec: ExpansionSpec,
    *,
    seed: int,
    batch_size: int,
    adapters: tuple[Params | None, ...] = (None, None, None),
    lora_scale: float = 1.0,
    on_batch: Callable[[int, dict], None] | None = None,
    skip: Callable[[int], bool] = lambda b: False,
    desc: str = "expand",
    progress: bool = True,
    mesh=None,
    on_level: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Samples trees for ``examples`` in batches of ``batch_size`` questions.

    Every batch is padded to ``batch_size`` questions and one prompt width, so the whole
    stage compiles once. ``on_batch(index, arrays)`` receives host arrays per batch;
    ``on_level(level, tokens, lengths)`` (optional, one device) the rows of each level of the
    current batch as soon as that level is sampled (flat rows, padding questions included). With a
    ``mesh``, the question batch (rounded up to a multiple of the data-parallel size) is split
    over the ``data``/``fsdp`` axes and every tree row is sampled on its question's device.

    With an empty verifier level (``spec.empty_levels`` holds 1) R's contexts are built with the
    codec's ``empty_critique_seps``: R reads its prompt with the critique ``""``.
    """
    from tqdm.auto import tqdm

    from malt_jax.parallel.distributed import shard_batch

    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp

    q_ids = [codec.question(e.question) for e in examples]
    width = _bucket32(max(len(q) for q in q_ids))
    separate = codec.framing == "separate" and spec.depth > 1
    codec_seps = codec.empty_critique_seps if 1 in spec.empty_levels else codec.seps
    if separate:  # the V and R contexts' per-question prefixes, padded to one width per level
        pre = [codec.prefixes(e.question) for e in examples]
        pre_width = [_bucket32(max(len(p[lv]) for p in pre)) for lv in range(2)]
        seps = tuple(tuple(jnp.asarray(t, jnp.int32) for t in level) for level in codec_seps)
        turns = None
    else:
        turns = tuple(jnp.asarray(t, jnp.int32) for t in codec_seps[1])
    n_batches = -(-len(examples) // batch_size)
    todo = [b for b in range(n_batches) if not skip(b)]
    bar = tqdm(total=len(todo) * batch_size, desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for b in todo:
        lo, hi = b * batch_size, min(len(examples), (b + 1) * batch_size)
        idx = list(range(lo, hi)) + [lo] * (batch_size - (hi - lo))  # pad with copies, dropped below
        x, lens = pad_batch([q_ids[i] for i in idx], bucket=width)
        k = hi - lo
        arrays = {"index": np.arange(lo, hi), "q_tokens": x[:k], "q_lens": lens[:k]}
        t0 = time.perf_counter()
        inputs: tuple = (jnp.asarray(x), jnp.asarray(lens), question_keys(seed, idx))
        contexts = None
        if separate:
            prefix_arrays = []
            for lv, role in enumerate(ROLES[1:]):
                px, pl = pad_batch([pre[i][lv] for i in idx], bucket=pre_width[lv])
                arrays[f"{role}_prefix"], arrays[f"{role}_prefix_lens"] = px[:k], pl[:k]
                prefix_arrays.append((jnp.asarray(px), jnp.asarray(pl)))
            inputs += tuple(prefix_arrays)
        if mesh is not None:
            inputs = shard_batch(inputs, mesh)
        if separate:
            (pv, lv_), (pr, lr) = inputs[3], inputs[4]
            contexts = Contexts(prefixes=(pv, pr), prefix_lens=(lv_, lr), seps=seps)
        tree = expand(
            model.params,
            tuple(adapters),
            inputs[0],
            inputs[1],
            turns,
            inputs[2],
            cfg=model.cfg,
            spec=spec,
            lora_scale=lora_scale,
            contexts=contexts,
            emit=on_level,
        )
        tree = fetch(tree)
        dt = time.perf_counter() - t0
        for level, role in enumerate(ROLES[: spec.depth]):
            arrays[f"{role}_tokens"] = np.asarray(tree.tokens[level])[:k]
            arrays[f"{role}_lengths"] = np.asarray(tree.lengths[level])[:k]
            arrays[f"{role}_logps"] = np.asarray(tree.logps[level])[:k]
            arrays[f"{role}_stopped"] = np.asarray(tree.stopped[level])[:k]
        n_tok = sum(int(np.asarray(tree.lengths[i]).sum()) for i in range(spec.depth))
        bar.set_postfix(tok_s=f"{n_tok / dt:.0f}")
        bar.update(batch_size)
        if on_batch:
            on_batch(b, arrays)
    bar.close()


def _bucket32(n: int) -> int:
    return -(-n // 32) * 32


def decode_level(tokenizer: Tokenizer, tokens: np.ndarray, lengths: np.ndarray, prefix: str = "") -> np.ndarray:
    """Object array of texts shaped like ``lengths`` (each ``prefix`` + the decoded output)."""
    flat_t = tokens.reshape(-1, tokens.shape[-1])
    flat_l = lengths.reshape(-1)
    out = np.empty(flat_l.shape[0], dtype=object)
    for i in range(flat_l.shape[0]):
        out[i] = prefix + tokenizer.decode(flat_t[i, : flat_l[i]].tolist(), skip_special_tokens=True)
    return out.reshape(lengths.shape)


def decode_tree(
    codec: PromptCodec, arrays: dict, roles: Sequence[str] = ROLES, empty: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Each role's texts of a sampled tree, read as graders and later roles read them.

    ``empty``: roles whose level was left empty (``ExpansionSpec.empty_levels``): their texts are
    ``""``, without the role's reply prefix (no turn was written, and the later roles read none).
    """
    out = {}
    for r in roles:
        lengths = arrays[f"{r}_lengths"]
        if r in empty:
            out[r] = np.full(lengths.shape, "", dtype=object)
        else:
            out[r] = decode_level(codec.tokenizer, arrays[f"{r}_tokens"], lengths, codec.task.prompts.prefix(r))
    return out


def grade_leaves(
    task: Task, examples: Sequence[Example], texts: np.ndarray, stopped: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(rewards, lenient)`` [Q, ...] of the final-role texts [Q, ...] against each question's gold.

    ``lenient`` is the task's grade (it may fall back to e.g. the last number in the text);
    ``rewards`` is 1 only where ``lenient`` is 1, the text states its answer explicitly
    (``task.has_explicit_answer``) and the completion stopped by itself (``stopped``, bool
    [Q, ...]; None = all stopped), so a refinement cut off at "... 2 + 4 = " earns nothing.
    Tasks with ``strict_rewards = False`` get ``rewards == lenient``.
    """
    strict = getattr(task, "strict_rewards", True)
    rewards = np.zeros(texts.shape, np.float32)
    lenient = np.zeros(texts.shape, np.float32)
    for q, ex in enumerate(examples):
        for idx in np.ndindex(texts.shape[1:]):
            c = (q,) + idx
            lenient[c] = task.grade_example(texts[c], ex)
            if lenient[c] and (
                not strict or ((stopped is None or stopped[c]) and task.has_explicit_answer(texts[c], ex))
            ):
                rewards[c] = 1.0
    return rewards, lenient


def run_expand(
    cfg: RunConfig,
    model: Model,
    task: Task,
    train: Sequence[Example],
    run_dir: Path,
    progress: bool = True,
    mesh=None,
    *,
    adapters: Mapping[str, Params | None] | None = None,
    seed_offset: int = 0,
) -> Path:
    """Stage 1: trajectory expansion of the training questions (resumable per batch).

    ``adapters``: per-role LoRA adapters (role letter -> adapter; a missing role or None = the
    base model) that sample the trees, e.g. an earlier round's trained chain (iterative MALT);
    with any adapter the levels are sampled in mode ``"fork"`` (each role's context encoded with
    its own adapter; ``"naive"`` without ``tree.share_prefix``). ``seed_offset`` is added to
    ``train.seed`` for the per-question sampling keys. Without either, the trees are exactly
    those of the plain pipeline.

    Without a critique (``tree.critique: false``) the verifier's level is left empty
    (``TreeConfig.empty_levels``): R refines each answer from its prompt with the critique ``""``
    and the trees' V texts are ``""``."""
    from malt_jax.model.lora import lora_scale

    out = run_dir / "expansion"
    out.mkdir(parents=True, exist_ok=True)
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    spec = ExpansionSpec.from_tree(cfg.tree, cfg.sampling, stop=codec.stop)
    role_adapters = tuple((adapters or {}).get(r) for r in ROLES)
    with_adapters = any(a is not None for a in role_adapters)
    if with_adapters and spec.mode == "extend":
        spec = dataclasses.replace(spec, mode="fork")
    bs = cfg.tree.questions_per_batch

    def save(b: int, arrays: dict) -> None:
        exs = [train[i] for i in arrays["index"]]
        texts = decode_tree(codec, arrays, empty=[ROLES[lv] for lv in spec.empty_levels])
        arrays["rewards"], arrays["rewards_lenient"] = grade_leaves(task, exs, texts["R"], arrays["R_stopped"])
        # whether each generator answer is right (graded as evaluation grades it): the verifier's
        # training data is balanced over right and wrong answers, and its verdicts are scored
        arrays["G_correct"] = grade_leaves(task, exs, texts["G"])[1] > 0
        arrays["rewards_explicit"] = np.array(
            [[task.has_explicit_answer(t, ex) for t in texts["R"][q].reshape(-1)] for q, ex in enumerate(exs)], bool
        ).reshape(texts["R"].shape)
        write_atomic(
            out / f"batch_{b:05d}.jsonl",
            "".join(
                json.dumps(
                    {
                        "id": ex.id,
                        "question": ex.question,
                        "gold": ex.answer,
                        "G": texts["G"][q].tolist(),
                        "V": texts["V"][q].tolist(),
                        "R": texts["R"][q].tolist(),
                        "rewards": arrays["rewards"][q].tolist(),
                        "rewards_lenient": arrays["rewards_lenient"][q].tolist(),
                    }
                )
                + "\n"
                for q, ex in enumerate(exs)
            ),
        )
        # last: a batch counts as done once its arrays exist
        write_atomic(out / f"batch_{b:05d}.npz", lambda f: np.savez(f, **arrays))

    sample_trees(
        model,
        codec,
        train,
        spec,
        seed=cfg.train.seed + seed_offset,
        batch_size=bs,
        adapters=role_adapters,
        lora_scale=lora_scale(cfg.lora) if with_adapters else 1.0,
        on_batch=save,
        skip=lambda b: (out / f"batch_{b:05d}.npz").exists(),
        desc="expand (train trees)",
        progress=progress,
        mesh=mesh,
    )
    # Batches are skipped by file name; files written with another batch size (e.g. a resume
    # on another device count, which rounds the batch) would silently drop or repeat questions.
    held: list[int] = []
    for f in out.glob("batch_*[0-9].npz"):
        with np.load(f) as z:
            held += z["index"].tolist()
    held.sort()
    if held != list(range(len(train))):
        raise ValueError(
            f"{out}: the expansion batches hold {len(held)} question(s) ({len(set(held))} distinct) "
            f"but the run has {len(train)} training questions; they were written with another batch "
            f"size or device count. Delete {out} to redo the expansion."
        )
    return out
