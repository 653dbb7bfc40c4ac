"""One iteration of online multi-agent GRPO (``malt-jax rl``), in pieces; the driver (iterations,
checkpoints, metrics) is :mod:`malt_jax.workflows.rl`.

    questions  -> :func:`iteration_questions`   which training questions iteration i uses
    trees      -> :func:`sample_iteration`      G -> V -> R trees sampled on-policy with the current
                                                adapters (``sample_trees``, mode "fork"), leaves graded
    advantages -> :func:`iteration_advantages`  per-role group-relative advantages of the joint reward
    rows       -> :func:`role_rows`             a role's (context, completion) token rows, node by node
    update     -> :func:`update_role`           reference (and behaviour) log-probs, then the
                                                policy-gradient updates of one role's adapter

With ``rl.agents: single`` (the single-agent GRPO baseline) the trees are G alone: ``tree.n``
answers per question (depth 1), each rewarded by the task's grade of that answer, G's advantages
taken over a question's answers (:class:`GroupAdvantages`); only G is trained.

Rows are built exactly as the credit stage builds SFT rows (``stages.credit.node_context`` /
``node_output``: the sampled token ids, never re-tokenized text, and the end-of-turn token after a
completion that stopped by itself), so the trainer scores what the sampler produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.config import ModelConfig, RunConfig
from malt_jax.credit.advantages import AdvantageConfig, TreeAdvantages, group_advantages, tree_advantages
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.parallel.distributed import fetch
from malt_jax.parallel.sharding import mesh_context
from malt_jax.roles import ROLES, role_name
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec
from malt_jax.stages.credit import node_context, node_output
from malt_jax.stages.expand import decode_tree, grade_leaves, sample_trees
from malt_jax.tasks import Example, Task
from malt_jax.training.pg_step import (
    PGConfig,
    batch_logps,
    compiled_pg_step,
    pg_batch,
    pg_signature,
    place_pg_batch,
)
from malt_jax.training.stepper import NonFiniteError, _Hashable
from malt_jax.training.steps import TrainState

__all__ = [
    "iteration_questions",
    "iteration_seed",
    "rl_spec",
    "sample_iteration",
    "sampled_tokens",
    "GroupAdvantages",
    "iteration_advantages",
    "role_rows",
    "update_role",
]


def iteration_questions(n_train: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """The training questions of ``iteration``: positions ``[i*k, (i+1)*k)`` of a stream of
    epochs, each a permutation of the ``n_train`` questions seeded by ``(seed, epoch)``, so every
    question is used once per epoch (a function of the iteration only: resumes are exact)."""
    out = []
    for pos in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, j = divmod(pos, n_train)
        out.append(int(np.random.default_rng([seed, 0x52C, epoch]).permutation(n_train)[j]))
    return out


def iteration_seed(key_data: np.ndarray) -> tuple[np.ndarray, int]:
    """``(next key, sampling seed)``: the iteration's sampling seed drawn from the run's key
    (``jax.random.key_data``, a host uint32 array carried in the checkpoints)."""
    key, sub = jax.random.split(jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32)))
    return np.asarray(jax.random.key_data(key)), int(jax.random.randint(sub, (), 0, 2**31 - 1))


def rl_spec(cfg: RunConfig, codec: PromptCodec) -> ExpansionSpec:
    """The trees of an RL iteration: the run's ``tree`` and ``sampling``, per-role adapters
    (``mode="fork"``: each parent context is encoded once with its role's adapter and its cache
    forked to the children; ``"naive"`` without ``tree.share_prefix``); depth 1 (G's ``tree.n``
    answers only) with ``rl.agents: single``."""
    return ExpansionSpec.from_tree(
        cfg.tree,
        cfg.sampling,
        stop=codec.stop,
        mode="fork" if cfg.tree.share_prefix else "naive",
        depth=cfg.rl.depth,
    )


def sample_iteration(
    model: Model,
    codec: PromptCodec,
    task: Task,
    questions: Sequence[Example],
    spec: ExpansionSpec,
    *,
    seed: int,
    batch_size: int,
    adapters: tuple[Params, Params, Params],
    lora_scale: float,
    mesh: Any = None,
) -> dict[str, np.ndarray]:
    """Samples one tree per question with the current role ``adapters`` (in batches of
    ``batch_size`` questions) and grades its leaves as the expand stage does
    (:func:`~malt_jax.stages.expand.grade_leaves`): the arrays of ``sample_trees`` for all
    questions, with ``rewards`` / ``rewards_lenient`` [Q, n, m, l] (the refinements graded);
    with ``spec.depth`` 1, [Q, n] (G's answers graded)."""
    parts: list[dict] = []
    sample_trees(
        model,
        codec,
        questions,
        spec,
        seed=seed,
        batch_size=batch_size,
        adapters=adapters,
        lora_scale=lora_scale,
        on_batch=lambda b, arrays: parts.append(arrays),
        progress=False,
        mesh=mesh,
    )
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    roles = ROLES[: spec.depth]
    texts = decode_tree(codec, arrays, roles)
    last = roles[-1]  # the leaves: R's refinements, or G's answers in depth-1 trees
    arrays["rewards"], arrays["rewards_lenient"] = grade_leaves(task, questions, texts[last], arrays[f"{last}_stopped"])
    return arrays


def sampled_tokens(arrays: dict[str, np.ndarray]) -> int:
    """Tokens the sampler generated for these trees (the output lengths of every role sampled)."""
    return int(sum(arrays[f"{r}_lengths"].sum() for r in ROLES if f"{r}_lengths" in arrays))


@dataclasses.dataclass(frozen=True)
class GroupAdvantages:
    """Single-agent GRPO's advantages (``rl.agents: single``): G's answers only, each group the
    ``n`` answers of one question, with :class:`~malt_jax.credit.advantages.TreeAdvantages`'
    interface for the generator.

    generator: Float32[Array, "Q n"]; metrics: ``generator/<name>`` scalars (the names of
    :func:`~malt_jax.credit.advantages.tree_advantages`).
    """

    generator: jax.Array
    metrics: dict[str, jax.Array]

    def advantages(self, role: str) -> jax.Array:
        """The advantages of ``role`` (a letter or a name); only the generator has any."""
        if role_name(role) != "generator":
            raise KeyError(f"single-agent GRPO trains the generator only, not the {role_name(role)}")
        return self.generator


def iteration_advantages(rewards: np.ndarray, cfg: RunConfig) -> TreeAdvantages | GroupAdvantages:
    """Per-role group-relative advantages of the leaves' joint rewards [Q, n, m, l]
    (``rl.baseline`` / ``rl.normalize``; :func:`~malt_jax.credit.advantages.tree_advantages`);
    with ``rl.agents: single``, G's advantages of its answers' rewards [Q, n] over each
    question's ``n`` answers (:func:`~malt_jax.credit.advantages.group_advantages`)."""
    config = AdvantageConfig(cfg.rl.baseline, cfg.rl.normalize)
    if cfg.rl.depth == 1:
        x = jnp.asarray(rewards)
        if x.ndim != 2:
            raise ValueError(f"single-agent rewards must have shape [Q, n], got {x.shape}")
        adv, metrics = group_advantages(x, config=config)
        return GroupAdvantages(adv, {"generator/" + k.split("/", 1)[1]: v for k, v in metrics.items()})
    return tree_advantages(jnp.asarray(rewards), config=config)


def role_rows(arrays: dict[str, np.ndarray], role: str, seps: Any, end_token: int) -> list[tuple[list[int], list[int]]]:
    """``(context, completion)`` token rows of every node of ``role`` in row-major coordinate
    order (the order of ``TreeAdvantages.advantages(role).reshape(-1)``)."""
    level = ROLES.index(role)
    shape = arrays[f"{role}_lengths"].shape  # [Q, n(, m(, l))]
    assert len(shape) == level + 2, (role, shape)
    return [(node_context(arrays, seps, c), node_output(arrays, c, end_token)) for c in np.ndindex(shape)]


def update_role(
    base: Params,
    state: TrainState,
    rows: list[tuple[list[int], list[int]]],
    adv: np.ndarray,
    reference: Params | None,
    cfg: RunConfig,
    update: Any,
    lora_scale: float,
    pad_id: int,
    model_cfg: ModelConfig,
    role: str = "role",
    mesh: Any = None,
) -> tuple[TrainState, list[dict[str, float]]]:
    """``rl.updates_per_iteration`` policy-gradient updates of one role on its rows.

    The reference log-probs (``reference``: the reference adapter, None = the base model) are
    computed once per iteration; with more than one update, so are the behaviour policy's (the
    adapter before the first update), which the later updates' ratios are taken against (one
    update is on-policy: ratio 1). Every log-prob is of the logits divided by the sampling
    temperature (``sampling.temperature``). Returns the new state and one metrics dict per update.
    Raises :class:`~malt_jax.training.stepper.NonFiniteError` (the update not applied).

    With ``mesh``, ``base`` and ``state`` are on it (``param_shardings`` / ``state_shardings``)
    and the step is the sharded one (:func:`~malt_jax.training.pg_step.compiled_pg_step`), the
    batch rows split over ``data`` x ``fsdp``; every process of a multi-host run passes the same
    rows (the same sampled trees) and gets the same metrics.
    """
    rl = cfg.rl
    micro = rl.micro_batch
    batch = pg_batch(rows, np.asarray(adv, np.float32).reshape(-1), micro, cfg.train.max_seq_len, pad_id)
    accum = batch["tokens"].shape[0] // micro
    temperature = float(cfg.sampling.temperature)
    pc = PGConfig(float(rl.clip_eps), float(rl.kl_coef), rl.loss_agg, accum, temperature)
    history = []
    with mesh_context(mesh):
        batch["ref"] = batch_logps(base, reference, batch, micro, model_cfg, lora_scale, temperature, mesh)
        if rl.updates_per_iteration > 1:
            batch["old"] = batch_logps(base, state.adapter, batch, micro, model_cfg, lora_scale, temperature, mesh)
        if mesh is None:
            step = compiled_pg_step(model_cfg, lora_scale, pc, update)
        else:  # sharded as the SFT / DPO steps are: base, state and batch rows with explicit shardings
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
            step = compiled_pg_step(model_cfg, lora_scale, pc, update, mesh, _Hashable(abstract), pg_signature(batch))
        placed = place_pg_batch(batch, mesh)
        for u in range(rl.updates_per_iteration):
            new, metrics = step(base, state, placed)
            host = {k: float(v) for k, v in fetch(metrics).items()}
            if not host.pop("finite"):
                raise NonFiniteError(
                    f"role {role_name(role)!r}: non-finite policy-gradient loss (loss={host['loss']}, "
                    f"grad_norm={host['grad_norm']}); the update was NOT applied and the last checkpoint is intact. "
                    "Lower rl.learning_rate.",
                    state=state,
                    metrics=host,
                )
            state = new
            history.append({"update": u, **host})
    return state, history
