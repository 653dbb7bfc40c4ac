"""G -> V -> R trajectory expansion as one jit-compiled, in-graph tree sampler.

For Q questions the tree has Q·n generator rows, Q·n·m verifier rows and Q·n·m·l refiner
rows. Two framings of the roles (see ``tasks.prompts``):

* **chat**: the roles form one growing chat::

      [question prompt] G-answer [V turn] V-critique [R turn] R-answer

  so the context of every node is its parent's context plus a few constant tokens (``turns``).
* **separate** (the paper's): every role has its own prompt that quotes the earlier outputs::

      V: [V prefix(q)] G-answer [sep]                          -> V-critique
      R: [R prefix(q)] G-answer [sep] V-critique [sep]         -> R-answer

  (:class:`Contexts`). A level's cache is built with prefix sharing: the level's question
  prefix is prefilled once per question, forked to the n answers, extended by each answer
  (and forked/extended again for the critiques), then forked to the siblings; siblings always
  share their parent's whole context, and no context is encoded twice.

Between levels the rows are *forked* (``repeat``) ``fanout`` times. In the chat framing there
are three ways to get the KV cache of a level:

* ``"extend"`` (roles share weights, e.g. the untrained base during data collection):
  the question is prefilled once; each level appends the role's turn tokens to the
  parent's cache and forks it: nothing is ever re-encoded.
* ``"fork"`` (roles have different adapters): each parent context is prefilled once with
  the role's weights and the cache is forked to its children. When the adapters cover only
  the top layers, the parent's cache is kept and only those layers are recomputed.
* ``"naive"`` (reference / benchmark baseline): contexts are forked first and every row
  re-encodes its whole prompt.

In the separate framing "extend" and "fork" both build each level's cache with sharing as
above (with the level's adapter, if any), and "naive" re-encodes every row's whole context.
All modes give the same samples for the same keys (tests check this): the token a row
samples at step t uses ``fold_in(row_key, t)``, and children keys are derived from the
parent's key and the child's index.

A level can be left **empty** (``ExpansionSpec.empty_levels``, e.g. the role ablation
G -> no critique -> R): it samples nothing (no decode, and no cache of its own where no later
level extends one) and its rows have length 0, so the later levels' contexts hold its
separators with nothing between them. It stays inside the one compiled program, and the other
levels' row keys do not change.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from malt_jax.config import ModelConfig, SamplingConfig, TreeConfig
from malt_jax.model.llama import KVCache, Params, lora_first_layer, refresh_top
from malt_jax.sampling.decode import PAD_ID, Generation, StopCriteria, decode, prefill

Mode = Literal["extend", "fork", "naive"]


@dataclasses.dataclass(frozen=True)
class ExpansionSpec:
    """The static shape of one compiled :func:`expand` call: fan-out per level, depth, token
    budgets, sampling and stop rules, cache mode (a jit static argument).

    A run's training trees take theirs from the config (:meth:`from_tree`: ``TreeConfig``'s
    branching, ``SamplingConfig``'s rules and budgets); evaluation chains are ``n = votes``,
    ``m = l = 1``, ``depth`` 1 or 3.

    ``empty_levels``: levels (1 = V, 2 = R; the generator always answers) that emit nothing:
    they are not sampled, their rows have length 0, PAD tokens (still ``max_new[level]`` wide),
    zero log-probs and ``stopped`` True (an empty turn is complete, not cut off), and they take
    no room in the later levels' caches. The later levels see the level's separators with
    nothing between them: for an empty verifier give the sampler the codec's
    ``empty_critique_seps`` (``stages.expand.sample_trees`` does), so R reads the critique ``""``.
    """

    n: int = 3
    m: int = 3
    l: int = 3
    max_new: tuple[int, int, int] = (96, 96, 96)  # per role G, V, R
    sampling: SamplingConfig = SamplingConfig()
    stop: StopCriteria = StopCriteria()
    depth: int = 3  # 1 = generator only, 3 = full G -> V -> R
    mode: Mode = "extend"
    empty_levels: tuple[int, ...] = ()  # levels that emit nothing (see the class doc)

    def __post_init__(self) -> None:
        levels = tuple(self.empty_levels)
        if any(lv not in (1, 2) for lv in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"ExpansionSpec.empty_levels must be distinct levels 1 (V) or 2 (R), got {levels!r}")

    @property
    def fanouts(self) -> tuple[int, int, int]:
        return (self.n, self.m, self.l)

    @property
    def budgets(self) -> tuple[int, ...]:
        """The tokens each level can add to a context: ``max_new``, 0 for the empty levels."""
        return tuple(0 if lv in self.empty_levels else b for lv, b in enumerate(self.max_new))

    @classmethod
    def from_tree(cls, tree: TreeConfig, sampling: SamplingConfig, **fields: Any) -> ExpansionSpec:
        """The spec of a training-tree expansion: ``tree.n``/``m``/``l``, ``sampling`` with its per-role
        budgets, mode ``"extend"`` (``"naive"`` without ``tree.share_prefix``), the verifier's
        level empty without ``tree.critique`` (``TreeConfig.empty_levels``); ``fields`` override."""
        return cls(
            **{
                "n": tree.n,
                "m": tree.m,
                "l": tree.l,
                "max_new": sampling.budgets(),
                "sampling": sampling,
                "mode": "extend" if tree.share_prefix else "naive",
                "empty_levels": tree.empty_levels,
                **fields,
            }
        )


@flax.struct.dataclass
class Contexts:
    """Separate-framing contexts of the levels after the first (V, R).

    The context of level ``L`` (1 = V, 2 = R) is ``prefixes[L-1][q]`` (right-padded, length
    ``prefix_lens[L-1][q]``) followed, for each earlier level ``a < L``, by that level's output and
    the constant tokens ``seps[L-1][a]``.
    """

    prefixes: tuple[jax.Array, ...]  # per level >= 1: [Q, P_L] int32
    prefix_lens: tuple[jax.Array, ...]  # per level >= 1: [Q] int32
    seps: tuple[tuple[jax.Array, ...], ...]  # per level L >= 1: L constant token arrays


@flax.struct.dataclass
class Tree:
    """Sampled tree; level i holds arrays shaped [Q, n, (m, (l,))] + [max_new_i] for tokens."""

    tokens: tuple[jax.Array, ...]
    lengths: tuple[jax.Array, ...]
    logps: tuple[jax.Array, ...]
    stopped: tuple[jax.Array, ...]


def _append(ctx: jax.Array, ctx_len: jax.Array, toks: jax.Array) -> jax.Array:
    """Writes toks [B, N] into ctx [B, S] starting at ctx_len [B] (overflow dropped)."""
    B, N = toks.shape
    cols = ctx_len[:, None] + jnp.arange(N)[None, :]
    return ctx.at[jnp.arange(B)[:, None], cols].set(toks, mode="drop")


def _fork(x: jax.Array, times: int) -> jax.Array:
    return jnp.repeat(x, times, axis=0)


def _join(tokens: jax.Array, lens: jax.Array, sep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the first ``lens[b]`` of ``tokens [B, N]`` followed by ``sep [S]``, right-padded."""
    B, N = tokens.shape
    S = sep.shape[0]
    if S == 0:
        return tokens, lens
    j = jnp.arange(N + S)[None, :]
    tok = jnp.pad(tokens, ((0, 0), (0, S)))
    rel = j - lens[:, None]
    out = jnp.where(rel < 0, tok, jnp.where(rel < S, sep[jnp.clip(rel, 0, S - 1)], 0))
    return out.astype(jnp.int32), lens + S


def _separate_level(
    params: Params,
    cfg: ModelConfig,
    contexts: Contexts,
    level: int,
    outs: list[tuple[jax.Array, jax.Array]],
    fanouts: tuple[int, ...],
    size: int,
    mode: Mode,
    lora: Params | None,
    lora_scale: float,
    fan: int,
) -> tuple[jax.Array, KVCache, jax.Array]:
    """Logits, cache and context lengths of level ``level``'s rows (its parents' contexts forked
    ``fan`` times: after encoding with sharing, before encoding in mode "naive")."""
    pre, pre_len = contexts.prefixes[level - 1], contexts.prefix_lens[level - 1].astype(jnp.int32)
    seps = contexts.seps[level - 1]
    if mode == "naive":  # every row encodes its whole context
        rows = 1
        for f in fanouts[:level]:
            rows *= f
        ctx, ctx_len = _fork(pre, rows), _fork(pre_len, rows)
        ctx = jnp.pad(ctx, ((0, 0), (0, size - ctx.shape[1])))
        for a in range(level):
            rest = 1
            for f in fanouts[a + 1 : level]:
                rest *= f
            block, blen = _join(_fork(outs[a][0], rest), _fork(outs[a][1], rest), seps[a])
            ctx = _append(ctx, ctx_len, block)
            ctx_len = ctx_len + blen
        ctx, ctx_len = _fork(ctx, fan), _fork(ctx_len, fan)
        cache = KVCache.zeros(cfg, ctx.shape[0], size)
        logits, cache = prefill(params, cfg, cache, ctx, ctx_len, jnp.zeros_like(ctx_len), lora, lora_scale)
        return logits, cache, ctx_len
    # prefix sharing: the question prefix once per question, each earlier output once per node;
    # the cache is made once the previous level is sampled (not alive beside that level's cache;
    # an empty level's zero-width output is no sample)
    sampled = next((o for o in reversed(outs) if o[0].size), None)
    cache = KVCache.zeros(cfg, pre.shape[0], size, after=sampled)
    logits, cache = prefill(params, cfg, cache, pre, pre_len, jnp.zeros_like(pre_len), lora, lora_scale)
    pos = pre_len
    for a in range(level):
        cache, pos = cache.repeat(fanouts[a]), _fork(pos, fanouts[a])
        block, blen = _join(outs[a][0], outs[a][1], seps[a])
        logits, cache = prefill(params, cfg, cache, block, blen, pos, lora, lora_scale)
        pos = pos + blen
    return _fork(logits, fan), cache.repeat(fan), _fork(pos, fan)


def _tree(levels: list, Q: int, spec: ExpansionSpec) -> Tree:
    """The levels' generations (flat rows) shaped [Q, n, (m, (l,))] (+ [max_new] for tokens)."""
    lead = [(Q,) + spec.fanouts[: i + 1] for i in range(len(levels))]
    return Tree(
        tokens=tuple(g.tokens.reshape(s + (-1,)) for g, s in zip(levels, lead)),
        lengths=tuple(g.lengths.reshape(s) for g, s in zip(levels, lead)),
        logps=tuple(g.logps.reshape(s + (-1,)) for g, s in zip(levels, lead)),
        stopped=tuple(g.stopped.reshape(s) for g, s in zip(levels, lead)),
    )


def _empty_level(ctx_len: jax.Array, width: int) -> Generation:
    """The generation of an empty level's rows (``ctx_len`` [rows]): nothing written."""
    rows = ctx_len.shape[0]
    return Generation(
        tokens=jnp.full((rows, width), PAD_ID, jnp.int32),
        lengths=jnp.zeros((rows,), jnp.int32),
        logps=jnp.zeros((rows, width), jnp.float32),
        stopped=jnp.ones((rows,), bool),
        end_pos=ctx_len.astype(jnp.int32),
    )


def _child_keys(keys: jax.Array, fanout: int) -> jax.Array:
    """Keys for the ``fanout`` children of every row (row-major, like ``_fork``)."""
    branch = jax.vmap(lambda k: jax.random.fold_in(k, 0x5EED))(keys)
    kids = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(jnp.arange(fanout)))(branch)
    return kids.reshape((-1,) + kids.shape[2:])


def _emit(emit: Any, level: int, gen: Any) -> None:
    """Hands a finished level's tokens [rows, max_new] and lengths [rows] to the host callback
    ``emit(level, tokens, lengths)`` (in order), so callers can show each role's turn as soon as
    it is sampled; the samples do not change."""
    if emit is not None:
        io_callback(partial(emit, level), None, gen.tokens, gen.lengths, ordered=True)


@partial(jax.jit, static_argnames=("cfg", "spec", "lora_scale", "emit"))
def expand(
    params: Params,
    adapters: tuple[Params | None, Params | None, Params | None],
    q_tokens: jax.Array,
    q_lens: jax.Array,
    turns: tuple[jax.Array, jax.Array],
    keys: jax.Array,
    *,
    cfg: ModelConfig,
    spec: ExpansionSpec,
    lora_scale: float = 1.0,
    contexts: Contexts | None = None,
    emit: Any = None,
) -> Tree:
    """Samples a G -> V -> R tree for Q questions.

    Args:
      params: base model parameters (shared by every role).
      adapters: per-role LoRA adapters (G, V, R); ``None`` = the bare base.
      q_tokens: [Q, Tq] right-padded question prompts (chat-rendered, ending with the
        assistant header); q_lens: [Q].
      turns: token arrays [Tv] and [Tr] appended before the verifier / refiner turns (they
        start by closing the previous assistant turn, e.g. ``<|im_end|>\\n<|im_start|>user...``).
      keys: [Q] per-question PRNG keys.
      contexts: the separate framing's V and R contexts (then ``turns`` is not used); ``None``
        = the chat framing.
      emit: optional host callback ``emit(level, tokens, lengths)`` called as each level ends.
    """
    Q, Tq = q_tokens.shape
    if contexts is not None:
        return _expand_separate(
            params, adapters, q_tokens, q_lens, keys, contexts, cfg=cfg, spec=spec, lora_scale=lora_scale, emit=emit
        )
    if spec.mode == "extend" and any(a is not None for a in adapters):
        raise ValueError(
            "expand: mode='extend' shares KV caches across roles, so it needs one set of "
            "weights for all roles; use mode='fork' with per-role adapters"
        )
    # Cache slots each level needs (its context plus its own output): every level decodes over
    # a cache of exactly that size, since attention reads all of a cache's slots at every step.
    turn_lens = (0,) + tuple(int(t.shape[0]) for t in turns[: spec.depth - 1])
    sizes = [Tq + sum(spec.budgets[: i + 1]) + sum(turn_lens[: i + 1]) for i in range(spec.depth)]
    size = sizes[-1]
    ctx = jnp.zeros((Q, size), jnp.int32).at[:, :Tq].set(q_tokens)
    ctx_len = q_lens.astype(jnp.int32)
    row_keys = keys
    cache: KVCache | None = None  # set by the first level's prefill (at the top for "extend")
    logits: jax.Array | None = None
    # "fork" with adapters on the top layers only: the layers below give the same keys/values
    # for every role, so a level keeps its parent's cache and recomputes only the top layers of
    # the context with its adapter (from the hidden states the cache stores at that layer).
    hidden_at = min(lora_first_layer(cfg, a) for a in adapters[: spec.depth])
    refresh = spec.mode == "fork" and 0 < hidden_at < cfg.n_layers
    if spec.mode == "extend":
        cache = KVCache.zeros(cfg, Q, sizes[0])
        logits, cache = prefill(params, cfg, cache, q_tokens, ctx_len, jnp.zeros((Q,), jnp.int32))

    levels = []
    for level in range(spec.depth):
        fan = spec.fanouts[level]
        lora = adapters[level]
        # an empty level encodes only what a later level extends ("extend" / "refresh": its turn)
        empty = level in spec.empty_levels
        if level > 0:  # append this role's turn tokens
            turn = turns[level - 1]
            B = ctx.shape[0]
            t = jnp.broadcast_to(turn[None, :], (B, turn.shape[0])).astype(jnp.int32)
            if spec.mode == "extend" or refresh:
                assert cache is not None and logits is not None  # the level above has decoded (and kept it)
                cache = cache.grow(sizes[level])
                if refresh:
                    cache = refresh_top(params, cfg, cache, ctx_len, lora, lora_scale)
                logits, cache = prefill(params, cfg, cache, t, jnp.full((B,), turn.shape[0]), ctx_len, lora, lora_scale)
            ctx = _append(ctx, ctx_len, t)
            ctx_len = ctx_len + turn.shape[0]
        if spec.mode == "extend" or (refresh and level > 0):
            assert cache is not None and logits is not None  # prefilled above or by the level above
            cache, logits = cache.repeat(fan), _fork(logits, fan)
        elif spec.mode == "fork" and not empty:
            cache = KVCache.zeros(cfg, ctx.shape[0], sizes[level], hidden_at=hidden_at if refresh else 0)
            logits, cache = prefill(params, cfg, cache, ctx, ctx_len, jnp.zeros_like(ctx_len), lora, lora_scale)
            cache, logits = cache.repeat(fan), _fork(logits, fan)
        ctx, ctx_len = _fork(ctx, fan), _fork(ctx_len, fan)
        row_keys = _child_keys(row_keys, fan)
        if spec.mode == "naive" and not empty:
            cache = KVCache.zeros(cfg, ctx.shape[0], sizes[level])
            logits, cache = prefill(params, cfg, cache, ctx, ctx_len, jnp.zeros_like(ctx_len), lora, lora_scale)
        if empty:  # nothing sampled; a cache holding the turn stays for the next level to extend
            gen = _empty_level(ctx_len, spec.max_new[level])
        else:
            assert cache is not None and logits is not None  # every mode has prefilled by now
            # the next level extends this level's cache ("extend", or "fork" refreshing the top layers)
            reused = level + 1 < spec.depth and (spec.mode == "extend" or refresh)
            gen, cache = _sample_level(
                params, cfg, cache, logits, ctx_len, row_keys, spec, level, lora, lora_scale, keep_cache=reused
            )
            ctx = _append(ctx, ctx_len, gen.tokens)
            ctx_len = ctx_len + gen.lengths
        levels.append(gen)
        _emit(emit, level, gen)
    return _tree(levels, Q, spec)


def _sample_level(
    params: Params,
    cfg: ModelConfig,
    cache: KVCache,
    logits: jax.Array,
    ctx_len: jax.Array,
    row_keys: jax.Array,
    spec: ExpansionSpec,
    level: int,
    lora: Params | None,
    lora_scale: float,
    keep_cache: bool = True,
) -> tuple[Generation, KVCache | None]:
    """Samples one level's rows (both framings): each row's key is its tree key folded with a
    fixed salt, so a row's sample depends only on its place in the tree. ``keep_cache=False``
    where the level's cache is not used afterwards (see ``sampling.decode``)."""
    sample_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0xA11CE))(row_keys)
    return decode(
        params,
        cfg,
        cache,
        logits,
        ctx_len,
        sample_keys,
        spec.sampling,
        spec.stop,
        spec.max_new[level],
        lora,
        lora_scale,
        keep_cache=keep_cache,
    )


def _expand_separate(
    params: Params,
    adapters: tuple[Params | None, ...],
    q_tokens: jax.Array,
    q_lens: jax.Array,
    keys: jax.Array,
    contexts: Contexts,
    *,
    cfg: ModelConfig,
    spec: ExpansionSpec,
    lora_scale: float,
    emit: Any = None,
) -> Tree:
    """:func:`expand` in the separate framing: every level builds its own cache (see module doc)."""
    Q, Tq = q_tokens.shape
    row_keys = keys
    outs: list[tuple[jax.Array, jax.Array]] = []
    levels = []
    for level in range(spec.depth):
        fan, lora = spec.fanouts[level], adapters[level]
        if level in spec.empty_levels:  # nothing sampled, no cache: its rows are zero-width outputs
            row_keys = _child_keys(row_keys, fan)
            rows = outs[-1][1].shape[0] * fan
            gen = _empty_level(jnp.zeros((rows,), jnp.int32), spec.max_new[level])
            outs.append((jnp.zeros((rows, 0), jnp.int32), gen.lengths))
            levels.append(gen)
            _emit(emit, level, gen)
            continue
        if level == 0:
            size = Tq + spec.max_new[0]
            ctx_len = q_lens.astype(jnp.int32)
            if spec.mode == "naive":
                cache = KVCache.zeros(cfg, Q * fan, size)
                logits, cache = prefill(
                    params,
                    cfg,
                    cache,
                    _fork(q_tokens, fan),
                    _fork(ctx_len, fan),
                    jnp.zeros((Q * fan,), jnp.int32),
                    lora,
                    lora_scale,
                )
            else:
                cache = KVCache.zeros(cfg, Q, size)
                logits, cache = prefill(
                    params, cfg, cache, q_tokens, ctx_len, jnp.zeros_like(ctx_len), lora, lora_scale
                )
                cache, logits = cache.repeat(fan), _fork(logits, fan)
            ctx_len = _fork(ctx_len, fan)
        else:
            seps = contexts.seps[level - 1]
            size = (
                contexts.prefixes[level - 1].shape[1]
                + sum(spec.budgets[: level + 1])
                + sum(int(t.shape[0]) for t in seps)
            )
            logits, cache, ctx_len = _separate_level(
                params, cfg, contexts, level, outs, spec.fanouts, size, spec.mode, lora, lora_scale, fan
            )
        row_keys = _child_keys(row_keys, fan)
        gen, _ = _sample_level(
            params, cfg, cache, logits, ctx_len, row_keys, spec, level, lora, lora_scale, keep_cache=False
        )
        outs.append((gen.tokens, gen.lengths))
        levels.append(gen)
        _emit(emit, level, gen)
    return _tree(levels, Q, spec)
