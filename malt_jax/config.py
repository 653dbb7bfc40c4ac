"""Typed, frozen configuration dataclasses, YAML loading and ``key=value`` overrides.

Every stage of the pipeline takes one of these small dataclasses; a run is a ``RunConfig``
that nests them. Unknown keys and wrong types are errors that name the offending key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key is unknown, missing or has the wrong type."""


def _check_min(section: str, obj: Any, **minimums: float) -> None:
    """Raises ConfigError naming ``section.field`` when a field is below its minimum."""
    for name, lo in minimums.items():
        value = getattr(obj, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < lo:
            raise ConfigError(f"{section}.{name} must be >= {lo}, got {value!r}")


def _check(section: str, obj: Any, name: str, ok: bool, expected: str) -> None:
    """Raises ``ConfigError("<section>.<name>: expected <expected>, got <value>")`` unless ``ok``."""
    if not ok:
        key = f"{section}.{name}" if section else name
        raise ConfigError(f"{key}: expected {expected}, got {getattr(obj, name)!r}")


def _type_error(value: Any, tp: Any) -> str | None:
    """What is wrong with ``value`` as a value of the field type ``tp`` (None: nothing). Floats
    must be finite (a NaN temperature or top_p silently breaks sampling)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = [_type_error(value, a) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else " or ".join(e for e in errors if e)
    if origin is Literal:
        return None if value in args else f"one of {', '.join(map(str, args))}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return None if isinstance(value, tp) else f"a {tp.__name__}"
    if origin is tuple:
        if not isinstance(value, tuple):
            return "a tuple"
        if len(args) == 2 and args[1] is Ellipsis:
            for item in value:
                err = _type_error(item, args[0])
                if err:
                    return f"items of {err}"
        elif args:
            if len(value) != len(args):
                return f"a tuple of {len(args)}"
            for item, a in zip(value, args):
                err = _type_error(item, a)
                if err:
                    return err
        return None
    if tp is bool:
        return None if isinstance(value, bool) else "a bool"
    if tp is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an int"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if tp is str:
        return None if isinstance(value, str) else "a string"
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check_types(section: str, obj: Any) -> None:
    """Checks every field of a config dataclass against its annotation (see :func:`_type_error`)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        err = _type_error(value, hints[f.name])
        if err:
            key = f"{section}.{f.name}" if section else f.name
            raise ConfigError(f"{key}: expected {err}, got {value!r}")


def _unit(x: float, lo_open: bool = False, hi_open: bool = False) -> bool:
    """Whether ``x`` lies in [0, 1] (with the named ends open)."""
    return (x > 0 if lo_open else x >= 0) and (x < 1 if hi_open else x <= 1)


# the decoder-layer projections a LoRA adapter can target (model/llama.py LAYER_WEIGHTS; kept
# here so that loading a config imports no JAX) and the device-mesh axes (parallel/sharding.py)
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
MESH_AXES = ("data", "fsdp", "tensor")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder."""

    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    # Llama 3.1 style rope scaling: None or dict(factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings).
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    dtype: Literal["float32", "bfloat16"] = "float32"  # activations / compute dtype
    remat: bool = False  # recompute each layer's activations in the backward pass (big models)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # architecture options of the same decoder (one code path): "llama" (SmolLM2, Llama 3),
    # "qwen2" (q/k/v projection biases) and "qwen3" (RMSNorm of every q and k head before rope)
    arch: Literal["llama", "qwen2", "qwen3"] = dataclasses.field(default="llama", metadata={"identity": "non-default"})

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"

    def __post_init__(self) -> None:
        # shapes may come from a weight file's metadata (config.json, GGUF): check them here
        if self.arch not in ("llama", "qwen2", "qwen3"):
            raise ConfigError(f"model.arch: expected one of llama, qwen2, qwen3, got {self.arch!r}")
        _check_types("model", self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            _check("model", self, name, getattr(self, name) >= 1, "a positive int")
        _check("model", self, "norm_eps", 0 < self.norm_eps < 1, "0 < norm_eps < 1")
        _check("model", self, "rope_theta", self.rope_theta > 0, "rope_theta > 0")
        if self.rope_scaling:
            s = dict(self.rope_scaling)
            _check(
                "model",
                self,
                "rope_scaling",
                sorted(s) == sorted(ROPE_SCALING_KEYS) and len(s) == len(self.rope_scaling),
                f"none or Llama-3 rope scaling with the keys {', '.join(ROPE_SCALING_KEYS)}",
            )
            _check(
                "model",
                self,
                "rope_scaling",
                all(v > 0 for v in s.values()) and s["low_freq_factor"] != s["high_freq_factor"],
                "positive values and low_freq_factor != high_freq_factor",
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")

    @property
    def n_params(self) -> int:
        """Every stored parameter of the model (what ``init_params`` allocates): matrices, RMSNorm
        weights, Qwen2 q/k/v biases, Qwen3 q/k norms, the embedding, and the LM head when it is
        not tied to the embedding."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.dim * self.hidden_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim

    @classmethod
    def smollm2_135m(cls, **kw: Any) -> ModelConfig:
        return cls(**kw)

    @classmethod
    def llama32_1b(cls, **kw: Any) -> ModelConfig:
        base: dict[str, Any] = dict(
            vocab_size=128256,
            dim=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            head_dim=64,
            hidden_dim=8192,
            norm_eps=1e-5,
            rope_theta=500000.0,
            tie_embeddings=True,
            max_seq_len=131072,
            dtype="bfloat16",
            param_dtype="bfloat16",
            rope_scaling=LLAMA3_ROPE_SCALING_32,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def llama31_8b(cls, **kw: Any) -> ModelConfig:
        base: dict[str, Any] = dict(
            vocab_size=128256,
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            hidden_dim=14336,
            norm_eps=1e-5,
            rope_theta=500000.0,
            tie_embeddings=False,
            max_seq_len=131072,
            dtype="bfloat16",
            param_dtype="bfloat16",
            rope_scaling=LLAMA3_ROPE_SCALING_8,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw: Any) -> ModelConfig:
        """A random-weight toy model for tests."""
        base: dict[str, Any] = dict(
            vocab_size=256,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            hidden_dim=128,
            rope_theta=10000.0,
            max_seq_len=512,
        )
        base.update(kw)
        return cls(**base)


LLAMA3_ROPE_SCALING_8 = (
    ("factor", 8.0),
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
    ("original_max_position_embeddings", 8192.0),
)
LLAMA3_ROPE_SCALING_32 = (
    ("factor", 32.0),
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 4.0),
    ("original_max_position_embeddings", 8192.0),
)

# Qwen shapes (from the released models' config.json): (arch, vocab, dim, layers, heads, kv heads,
# head_dim, ffn, tied embeddings, context). Norm eps 1e-6, rope theta 1e6, bfloat16.
QWEN_SHAPES = {
    "qwen2.5-0.5b": ("qwen2", 151936, 896, 24, 14, 2, 64, 4864, True, 32768),
    "qwen2.5-1.5b": ("qwen2", 151936, 1536, 28, 12, 2, 128, 8960, True, 131072),
    "qwen2.5-7b": ("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, False, 131072),
    "qwen3-0.6b": ("qwen3", 151936, 1024, 28, 16, 8, 128, 3072, True, 40960),
    "qwen3-1.7b": ("qwen3", 151936, 2048, 28, 16, 8, 128, 6144, True, 40960),
    "qwen3-8b": ("qwen3", 151936, 4096, 36, 32, 8, 128, 12288, False, 40960),
}


def _qwen_preset(name: str) -> Any:
    arch, vocab, dim, layers, heads, kv, hd, ffn, tied, ctx = QWEN_SHAPES[name]

    def make(**kw: Any) -> ModelConfig:
        return ModelConfig(
            **{
                **dict(
                    arch=arch,
                    vocab_size=vocab,
                    dim=dim,
                    n_layers=layers,
                    n_heads=heads,
                    n_kv_heads=kv,
                    head_dim=hd,
                    hidden_dim=ffn,
                    norm_eps=1e-6,
                    rope_theta=1e6,
                    tie_embeddings=tied,
                    max_seq_len=ctx,
                    dtype="bfloat16",
                    param_dtype="bfloat16",
                ),
                **kw,
            }
        )

    return make


MODEL_PRESETS = {
    "smollm2-135m": ModelConfig.smollm2_135m,
    "llama-3.2-1b": ModelConfig.llama32_1b,
    "llama-3.1-8b": ModelConfig.llama31_8b,
    **{name: _qwen_preset(name) for name in QWEN_SHAPES},
    "tiny": ModelConfig.tiny,
}


def _check_preset(preset: Any) -> None:
    """Raises ConfigError unless ``preset`` names one of :data:`MODEL_PRESETS`."""
    if not isinstance(preset, str) or preset not in MODEL_PRESETS:
        raise ConfigError(f"model_preset: unknown preset {preset!r}; choose from {sorted(MODEL_PRESETS)}")


def _check_mesh(obj: Any) -> None:
    """Checks ``obj.mesh`` (axis, size) pairs: known axes, each at most once, sizes >= 1 or
    one -1 (the rest of the devices)."""
    axes = [a for a, _ in obj.mesh]
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
        raise ConfigError(f"mesh: unknown axis {bad[0]!r}; axes are {', '.join(MESH_AXES)}")
    _check("", obj, "mesh", len(set(axes)) == len(axes), "each axis at most once")
    sizes = [n for _, n in obj.mesh]
    _check("", obj, "mesh", all(n >= 1 or n == -1 for n in sizes), "axis sizes >= 1 (or one of -1: the rest)")
    _check("", obj, "mesh", sizes.count(-1) <= 1, "at most one axis of size -1")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.3
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 128
    # per-role budgets (G, V, R) for expansion AND evaluation; empty = max_new_tokens for trees,
    # eval.max_new_tokens for evaluation
    role_max_new_tokens: tuple[int, ...] = ()
    greedy: bool = False
    # Decoding runs until a batch's longest row ends. When half of the rows have ended, the live
    # rows continue alone in a half-size batch (up to this many halvings; 0 = never). Speed only:
    # the samples are the same, so it is not part of a run's identity (config hash).
    compact_levels: int = dataclasses.field(default=2, metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("sampling", self)
        _check_min("sampling", self, temperature=0, top_k=0, max_new_tokens=1, compact_levels=0)
        _check("sampling", self, "top_p", 0 < self.top_p <= 1, "0 < top_p <= 1")
        if self.role_max_new_tokens and (len(self.role_max_new_tokens) != 3 or min(self.role_max_new_tokens) < 1):
            raise ConfigError(
                f"sampling.role_max_new_tokens must be empty or three ints >= 1 (G, V, R), "
                f"got {list(self.role_max_new_tokens)}"
            )

    @property
    def is_greedy(self) -> bool:
        """Whether tokens are picked greedily (``greedy``, or a temperature of 0)."""
        return self.greedy or self.temperature <= 0.0

    def budgets(self, default: int | None = None) -> tuple[int, int, int]:
        """New-token budgets of G, V, R (``role_max_new_tokens``, else ``default`` or
        ``max_new_tokens`` for each)."""
        if self.role_max_new_tokens:
            return tuple(int(x) for x in self.role_max_new_tokens)  # type: ignore[return-value]
        n = self.max_new_tokens if default is None else default
        return (n, n, n)


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """Branching of trajectory expansion: n generator samples, m critiques each, l refinements each."""

    n: int = 3
    m: int = 3
    l: int = 3
    questions_per_batch: int = 4
    share_prefix: bool = True
    # false: the paper's role ablation "G and R trained with an empty critique" as a run of its
    # own. The verifier's level is left empty (nothing sampled; R reads its prompt with the
    # critique "", ``PromptCodec.empty_critique_seps``), only G and R get training data and
    # adapters, and the run's trained chains are evaluated as G -> (no critique) -> R. Every
    # empty critique is the same, so such a tree has one per answer: ``m`` must be 1 (``l``
    # refinements of each answer). ``malt-jax run`` only. Added later: part of a run's identity
    # only when set.
    critique: bool = dataclasses.field(default=True, metadata={"identity": "non-default"})

    def __post_init__(self) -> None:
        _check_types("tree", self)
        _check_min("tree", self, n=1, m=1, l=1, questions_per_batch=1)
        _check("tree", self, "m", self.critique or self.m == 1, "1 with tree.critique: false (one empty critique)")

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles a run trains (and evaluates with their adapters): G, V and R; G and R without
        a critique."""
        return ("G", "V", "R") if self.critique else ("G", "R")

    @property
    def empty_levels(self) -> tuple[int, ...]:
        """The tree levels left empty (``ExpansionSpec.empty_levels``): V's (1) without a critique."""
        return () if self.critique else (1,)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    # Adapt only the top k layers (0 = all). The frozen layers below then need no backward pass,
    # which makes CPU training several times cheaper.
    top_layers: int = 0

    def __post_init__(self) -> None:
        _check_types("lora", self)
        _check_min("lora", self, rank=1, top_layers=0)
        _check("lora", self, "alpha", self.alpha > 0, "alpha > 0")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"lora.targets: unknown weight {bad[0]!r}; valid targets are {LORA_TARGETS}")
        _check("lora", self, "targets", len(self.targets) >= 1, "at least one of " + ", ".join(LORA_TARGETS))
        _check("lora", self, "targets", len(set(self.targets)) == len(self.targets), "no duplicates")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 2e-4
    # Linear warmup over ceil(warmup_ratio * the stage's total steps) updates (>= 1 when the ratio
    # is > 0, < total so the cosine decay always runs), then cosine decay to 0.
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    # MAXIMUM epochs per stage; with a held-out set the best epoch (held-out loss) is kept and a
    # stage stops after ``early_stop_patience`` epochs without improvement (0 = never early).
    sft_epochs: int = 2
    dpo_epochs: int = 1
    early_stop_patience: int = 2
    dpo_learning_rate: float = 5e-5
    dpo_beta: float = 0.2
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    # weight of the chosen completions' per-token NLL added to the DPO loss (TRL's rpo_alpha; RPO,
    # arXiv 2404.19733); 0 = plain DPO. Added later: part of a run's identity only when set.
    rpo_alpha: float = dataclasses.field(default=0.0, metadata={"identity": "non-default"})
    max_seq_len: int = 512
    value_threshold: float = 0.5
    max_pairs_per_parent: int = 2
    generator_dpo: bool = False
    # weight the verifier's SFT examples / DPO pairs so that those under right and under wrong
    # generator answers carry equal weight (see pipeline.build_datasets)
    verifier_balance: bool = True
    # fraction of the training questions whose examples are held out to choose epochs (0 = none)
    heldout_fraction: float = 0.1
    # Of those held-out questions, the fraction (at least one when > 0 and there are two or
    # more) whose examples only *report* the held-out metrics (``report/...`` at the start and at
    # the selected epoch) and never choose an epoch, so the figures reported for the selected
    # epoch are not measured on the set that selected it. 0 = all of them choose epochs, and the
    # held-out metrics of the selected epoch are selection-set (optimistic) figures. Added
    # later: part of a run's identity only when set.
    heldout_report_fraction: float = dataclasses.field(default=0.0, metadata={"identity": "non-default"})
    # Budget caps per role (0 = use everything): a seeded random subset of the SFT examples /
    # DPO pairs is kept, e.g. to fit a CPU time budget.
    max_sft_examples: int = 0
    max_dpo_pairs: int = 0
    checkpoint_every: int = 50
    seed: int = 0
    # DPO reference policy: "sft" = the role's adapter as it was when DPO started (MALT paper),
    # "base" = the adapter-free base model. Its log-probs are precomputed once (see train.py).
    dpo_reference: Literal["sft", "base"] = "sft"
    # DPO steps pack a pair into one row, its prompt once (data.pack_dpo_shared): the same
    # losses as one row per completion (to float rounding) for fewer tokens, so it is not part
    # of the run's identity.
    dpo_shared_prompt: bool = dataclasses.field(default=True, metadata={"identity": False})
    # On one CPU device (no mesh), training keeps per-layer copies of the adapted layers' base
    # weights and runs those layers unrolled (llama.unstack_top): faster steps for those layers'
    # weights once more in memory and longer compiles; the same results, so not identity.
    unstack_layers: bool = dataclasses.field(default=True, metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("train", self)
        _check_min(
            "train",
            self,
            learning_rate=0,
            dpo_learning_rate=0,
            warmup_ratio=0,
            grad_clip=0,
            batch_size=1,
            grad_accum=1,
            sft_epochs=0,
            dpo_epochs=0,
            max_seq_len=2,
            max_sft_examples=0,
            max_dpo_pairs=0,
            early_stop_patience=0,
            heldout_fraction=0,
            heldout_report_fraction=0,
            weight_decay=0,
            max_pairs_per_parent=0,
            checkpoint_every=1,
            seed=0,
        )
        if isinstance(self.heldout_fraction, (int, float)) and not self.heldout_fraction < 1:
            raise ConfigError(f"train.heldout_fraction must be < 1, got {self.heldout_fraction!r}")
        if isinstance(self.heldout_report_fraction, (int, float)) and not self.heldout_report_fraction < 1:
            raise ConfigError(f"train.heldout_report_fraction must be < 1, got {self.heldout_report_fraction!r}")
        if isinstance(self.warmup_ratio, (int, float)) and not self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be < 1, got {self.warmup_ratio!r}")
        _check("train", self, "dpo_beta", self.dpo_beta > 0, "dpo_beta > 0")
        _check("train", self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "0 <= label_smoothing < 0.5")
        _check("train", self, "rpo_alpha", self.rpo_alpha >= 0, "rpo_alpha >= 0")
        _check("train", self, "value_threshold", _unit(self.value_threshold), "0 <= value_threshold <= 1")
        _check(
            "train",
            self,
            "grad_accum",
            self.batch_size % self.grad_accum == 0,
            f"a divisor of train.batch_size={self.batch_size} (a microbatch is batch_size / grad_accum)",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    votes: int = 3
    batch_questions: int = 0  # questions per sampling batch (0 = all at once)
    temperature: float = 0.3
    max_new_tokens: int = 128
    bootstrap_samples: int = 2000
    seed: int = 1
    sft_chain: bool = False  # also evaluate the SFT-only trained chain (the paper's STaR-style ablation)
    # also evaluate the paper's role ablations of the trained chain (stages.eval.ABLATIONS: only G
    # trained; G and V; G and R with the untrained V; G and R with an empty critique)
    ablations: bool = dataclasses.field(default=False, metadata={"identity": "non-default"})

    def __post_init__(self) -> None:
        _check_types("eval", self)
        _check_min(
            "eval", self, votes=1, batch_questions=0, temperature=0, max_new_tokens=1, bootstrap_samples=1, seed=0
        )


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str = "synthetic"
    path: str = ""  # local data file/dir for real benchmarks
    num_train: int = 32
    num_eval: int = 100
    seed: int = 0
    # task-specific knobs (e.g. synthetic difficulty), kept as a flat mapping
    options: tuple[tuple[str, Any], ...] = ()
    # how the roles see each other: "chat" (one growing conversation) or "separate" (each role
    # its own prompt quoting the earlier outputs, as in the paper); see tasks/prompts.py
    framing: Literal["chat", "separate"] = "chat"

    def __post_init__(self) -> None:
        _check_types("task", self)
        _check_min("task", self, num_train=1, num_eval=1, seed=0)
        # the name itself (a registered task or package.module:Class) is checked by tasks.get_task
        _check("task", self, "name", bool(self.name.strip()), "a task name")
        keys = [k for k, _ in self.options]
        _check("task", self, "options", len(set(keys)) == len(keys), "a mapping without repeated keys")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A learning-curve study (``malt-jax study``): MALT trained on nested training sets of these
    sizes (the first k of ``task.num_train`` questions, one shared expansion), every system
    evaluated on the same held-out questions. Empty = not a study."""

    train_sizes: tuple[int, ...] = ()
    results: str = ""  # JSON summaries + plot go to <results>/<name>*.json|png ("" = <run_dir>/results)
    # at which sizes the SFT-only chain (STaR-style ablation) is evaluated: "all" or "largest"
    # (it only selects evaluations, so it is not part of the run's identity)
    sft_chain: str = dataclasses.field(default="largest", metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("study", self)
        if self.sft_chain not in ("all", "largest"):
            raise ConfigError(f"study.sft_chain must be 'all' or 'largest', got {self.sft_chain!r}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.train_sizes):
            raise ConfigError(f"study.train_sizes must be ints >= 1, got {list(self.train_sizes)}")
        if len(set(self.train_sizes)) != len(self.train_sizes):
            raise ConfigError(f"study.train_sizes has duplicates: {list(self.train_sizes)}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Online multi-agent GRPO (``malt-jax rl``): every iteration samples G -> V -> R trees
    (``tree.n`` x ``tree.m`` x ``tree.l``) on-policy for ``questions_per_iteration`` training
    questions, rewards the leaves with the task's grader and updates each trained role's LoRA
    adapter with the clipped policy-gradient loss and a k3 KL penalty to the reference.
    ``agents: single``: the single-agent GRPO baseline instead (G alone, ``tree.n`` answers per
    question, each rewarded by its own grade). ``iterations: 0`` (the default) = not an RL run.
    Added later: part of a run's identity only when set."""

    iterations: int = 0
    questions_per_iteration: int = 4
    learning_rate: float = 5e-5  # peak; warmup / cosine / clipping as the train section's
    kl_coef: float = 0.04  # weight of the k3 KL to the reference (GRPO's beta); 0 = off
    clip_eps: float = 0.2  # the ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    updates_per_iteration: int = 1  # optimizer updates on each iteration's samples (GRPO's mu)
    baseline: Literal["mean", "loo"] = "mean"  # group mean (GRPO) or leave-one-out mean (RLOO)
    normalize: Literal["std", "none"] = "std"  # divide by the group's std (GRPO) or not (Dr. GRPO)
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum_norm"] = "token_mean"  # training/pg_loss.py
    # the reference policy of the KL term, and the policy RL starts from: "base" = adapters off
    # (fresh adapters, b = 0); "sft" = the SFT adapters (adapters/{G,V,R}_sft.safetensors) of the
    # run directory ``sft_run``. An RL run must name one.
    reference: Literal["", "base", "sft"] = ""
    sft_run: str = ""
    roles: tuple[str, ...] = ("G", "V", "R")  # the roles trained; the others keep their start adapter
    # which system is trained: "multi" = the G -> V -> R chain (trees tree.n x tree.m x tree.l, the
    # leaves' joint reward credited to every role among its siblings); "single" = the single-agent
    # GRPO baseline: G alone samples tree.n answers per question (depth-1 trees; tree.m, tree.l
    # unused), each rewarded by the task's grade of its own answer, advantages over a question's
    # n answers (rl.roles must be [G]), evaluated as G's trained adapter alone ("single-trained").
    # Added later: part of a run's identity only when set.
    agents: Literal["multi", "single"] = dataclasses.field(default="multi", metadata={"identity": "non-default"})
    token_budget: int = 0  # stop once this many tokens have been sampled in all (0 = no cap)
    checkpoint_every: int = 1  # iterations between orbax checkpoints (and at the end)
    seed: int = 0
    # rows per forward / backward pass of an update (gradients summed over the passes); the same
    # update to float rounding, so not part of the run's identity
    micro_batch: int = dataclasses.field(default=8, metadata={"identity": False})
    # held-out accuracy during training: the current adapters evaluated on ``eval_questions``
    # questions of the task's validation split (disjoint from the training and evaluation
    # questions) before the first update, every ``eval_every`` iterations and after the last
    # (0 = off); the evaluation reads none of the run's RNG, so neither is part of its identity
    eval_every: int = dataclasses.field(default=0, metadata={"identity": False})
    eval_questions: int = dataclasses.field(default=200, metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("rl", self)
        _check_min(
            "rl",
            self,
            iterations=0,
            questions_per_iteration=1,
            kl_coef=0,
            updates_per_iteration=1,
            token_budget=0,
            checkpoint_every=1,
            seed=0,
            micro_batch=1,
            eval_every=0,
            eval_questions=1,
        )
        _check("rl", self, "learning_rate", self.learning_rate > 0, "learning_rate > 0")
        _check("rl", self, "clip_eps", self.clip_eps > 0, "clip_eps > 0")
        _check("rl", self, "roles", len(self.roles) >= 1, "at least one of G, V, R")
        _check("rl", self, "roles", all(r in ("G", "V", "R") for r in self.roles), "roles among G, V, R")
        _check("rl", self, "roles", len(set(self.roles)) == len(self.roles), "no duplicates")
        if self.agents == "single":
            _check("rl", self, "roles", self.roles == ("G",), "[G] with rl.agents: single (G alone is trained)")
        if self.reference == "sft":
            _check("rl", self, "sft_run", bool(self.sft_run.strip()), "the run directory of the SFT adapters")
        else:
            _check("rl", self, "sft_run", not self.sft_run, "empty unless rl.reference is sft")
        if self.iterations > 0:
            _check("rl", self, "reference", bool(self.reference), "base or sft for an RL run (rl.iterations > 0)")

    @property
    def depth(self) -> int:
        """The levels of an iteration's trees: 3 (G -> V -> R), 1 with ``agents: single`` (G only)."""
        return 1 if self.agents == "single" else 3

    def tree_tokens(self, tree: TreeConfig, sampling: SamplingConfig) -> int:
        """The most tokens one question's tree samples (every node at its role's budget; with
        ``agents: single`` the tree is G's ``tree.n`` answers)."""
        g, v, r = sampling.budgets()
        if self.depth == 1:
            return tree.n * g
        return tree.n * g + tree.n * tree.m * v + tree.n * tree.m * tree.l * r


# the value threshold the default schedule of iterative MALT rises to at its last round
ITERATE_TOP_THRESHOLD = 0.9


@dataclasses.dataclass(frozen=True)
class IterateConfig:
    """Iterative MALT (``malt-jax iterate``, ``workflows/iterate.py``): ``rounds`` offline MALT
    rounds (expand -> credit -> train), round r's trees sampled by round r - 1's trained chain,
    each round's chain scored on ``val_questions`` questions of the task's validation split
    (disjoint from the training and evaluation questions). ``rounds: 1`` (the default) = plain
    MALT. Added later: part of a run's identity only when set."""

    rounds: int = 1
    # where each round's training starts: "previous" = the previous round's adapters (round 1:
    # fresh ones), "base" = fresh adapters every round (only the trees come from the better chain)
    init: Literal["previous", "base"] = "previous"
    # per-round value thresholds of the credit stage; empty = the default schedule
    # (:meth:`round_thresholds`: linear from train.value_threshold to 0.9 at the last round)
    thresholds: tuple[float, ...] = ()
    # stop after the first round whose validation MALT+MV@k accuracy is not above the previous
    # round's, keeping the previous round's adapters as the final ones
    stop_on_no_gain: bool = True
    val_questions: int = 200  # validation-split questions that judge the rounds

    def __post_init__(self) -> None:
        _check_types("iterate", self)
        _check_min("iterate", self, rounds=1, val_questions=1)
        _check("iterate", self, "thresholds", all(_unit(t) for t in self.thresholds), "values in [0, 1]")
        n, rounds = len(self.thresholds), self.rounds
        _check("iterate", self, "thresholds", n in (0, rounds), f"none or one per round (iterate.rounds={rounds})")

    def round_thresholds(self, base: float) -> tuple[float, ...]:
        """The value threshold of each round: ``thresholds`` when given, else the paper's
        suggestion (raise it towards 1 as the chain improves) as a linear schedule from ``base``
        (``train.value_threshold``, exactly, so round 1 is plain MALT) to ``max(base, 0.9)`` at
        the last round, the later rounds rounded to 6 decimals: 0.5, 0.7, 0.9 for three rounds
        from 0.5."""
        if self.thresholds:
            return tuple(float(t) for t in self.thresholds)
        if self.rounds == 1:
            return (float(base),)
        top, last = max(float(base), ITERATE_TOP_THRESHOLD), self.rounds - 1
        return (float(base),) + tuple(round(base + (top - base) * r / last, 6) for r in range(1, self.rounds))


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model_preset: str = "smollm2-135m"
    weights: str = "smollm2"  # "smollm2" (embedded GGUF), a .gguf path, an HF dir, or "random"
    run_dir: str = "runs/default"
    mesh: tuple[tuple[str, int], ...] = ()  # e.g. (("data", 8),) ; empty = all devices on "data"
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    sampling: SamplingConfig = SamplingConfig()
    tree: TreeConfig = TreeConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    study: StudyConfig = StudyConfig()
    # online multi-agent GRPO (malt-jax rl); added later: part of the identity only when set
    rl: RLConfig = dataclasses.field(default=RLConfig(), metadata={"identity": "non-default"})
    # iterative MALT (malt-jax iterate); added later: part of the identity only when set
    iterate: IterateConfig = dataclasses.field(default=IterateConfig(), metadata={"identity": "non-default"})
    # also write the run's JSON summary to <results>/<name>.json ("" = only <run_dir>/summary.json)
    results: str = dataclasses.field(default="", metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("", self)
        _check_preset(self.model_preset)
        for name in ("name", "weights", "run_dir"):
            _check("", self, name, bool(getattr(self, name).strip()), "a non-empty string")
        _check("", self, "name", not set(self.name) & set("/\\"), "a name without path separators")
        _check_mesh(self)
        n_layers, vocab_size = self.model.n_layers, self.model.vocab_size
        lora_ok, top_k_ok = self.lora.top_layers <= n_layers, self.sampling.top_k <= vocab_size
        _check("lora", self.lora, "top_layers", lora_ok, f"0 <= top_layers <= model.n_layers={n_layers}")
        _check("sampling", self.sampling, "top_k", top_k_ok, f"0 <= top_k <= model.vocab_size={vocab_size}")
        if self.study.train_sizes and max(self.study.train_sizes) > self.task.num_train:
            raise ConfigError(
                f"study.train_sizes: the largest size {max(self.study.train_sizes)} exceeds "
                f"task.num_train={self.task.num_train} (the questions expanded for the study)"
            )
        if not self.tree.critique:
            self._check_no_critique()
        if self.rl.iterations > 0:
            self._check_rl()

    def _check_rl(self) -> None:
        """An RL run's cross-field checks: groups of two or more (of G's answers only with
        ``rl.agents: single``), a token budget of at least one tree, no more questions per
        iteration than training questions."""
        for dim in ("n", "m", "l")[: self.rl.depth]:
            size = getattr(self.tree, dim)
            ok = size >= 2
            _check("tree", self.tree, dim, ok, f">= 2 for an RL run (a group of {size} sample has no baseline)")
        one_tree, budget = self.rl.tree_tokens(self.tree, self.sampling), self.rl.token_budget
        budget_ok = budget == 0 or budget >= one_tree
        _check("rl", self.rl, "token_budget", budget_ok, f"0 (no cap) or >= one tree's {one_tree} tokens")
        k, n_train = self.rl.questions_per_iteration, self.task.num_train
        _check("rl", self.rl, "questions_per_iteration", k <= n_train, f"<= task.num_train={n_train}")
        sampled = not self.sampling.is_greedy
        _check("sampling", self.sampling, "temperature", sampled, "> 0 (and sampling.greedy off) for an RL run")

    def _check_no_critique(self) -> None:
        """A run without a critique (``tree.critique: false``) trains no verifier: the role
        ablations (which need one) and the workflows that sample full G -> V -> R trees with
        trained roles (RL, iterative MALT) are refused."""
        no_v = "false with tree.critique: false (no verifier is trained)"
        _check("eval", self.eval, "ablations", not self.eval.ablations, no_v)
        for ok, what in (
            (self.rl.iterations == 0, "an RL run (rl.iterations > 0)"),
            (self.iterate.rounds == 1, "iterative MALT (iterate.rounds > 1)"),
        ):
            if not ok:
                raise ConfigError(f"tree.critique: false is not supported by {what}; it is a malt-jax run option")

    def hash(self) -> str:
        """The run's identity: :func:`config_hash` of the fields that define its results."""
        return config_hash(self)


# Fields removed from a config section, with the one value every config had for them: a config's
# identity still lists them (so the hashes of earlier runs stay valid), and a config file naming
# one at that value (an earlier run directory's config.yaml) still loads. ``stop_strings`` was
# part of the hash but never applied.
RETIRED_FIELDS: dict[type, dict[str, Any]] = {SamplingConfig: {"stop_strings": ()}}


# --------------------------------------------------------------------------------------------
# dict <-> dataclass with checking


def to_dict(cfg: Any, identity_only: bool = False) -> Any:
    """Plain dict/list form of a config; ``identity_only`` leaves out speed-only fields (those
    with ``metadata={"identity": False}``), which do not change a run's results, and fields
    added later at their default (``metadata={"identity": "non-default"}``), and lists the
    ``RETIRED_FIELDS``, so the hashes of earlier runs stay valid."""
    if dataclasses.is_dataclass(cfg):

        def keep(f: dataclasses.Field) -> bool:
            if not identity_only:
                return True
            ident = f.metadata.get("identity", True)
            return ident is True or (ident == "non-default" and getattr(cfg, f.name) != f.default)

        out = {f.name: to_dict(getattr(cfg, f.name), identity_only) for f in dataclasses.fields(cfg) if keep(f)}
        if identity_only:
            out.update({k: to_dict(v) for k, v in RETIRED_FIELDS.get(type(cfg), {}).items()})
        return out
    if isinstance(cfg, tuple):
        if cfg and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in cfg):
            return {k: to_dict(v, identity_only) for k, v in cfg}
        return [to_dict(x, identity_only) for x in cfg]
    return cfg


def config_hash(cfg: Any, identity_only: bool = True) -> str:
    """12 hex digits of the SHA-256 of a config's :func:`to_dict` (``identity_only``: the run's
    identity, see there; ``False``: every field)."""
    return hashlib.sha256(json.dumps(to_dict(cfg, identity_only), sort_keys=True).encode()).hexdigest()[:12]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is tuple:
        # mapping-shaped tuple: tuple[tuple[str, X], ...]
        if (
            len(args) == 2
            and args[1] is Ellipsis
            and typing.get_origin(args[0]) is tuple
            and typing.get_args(args[0])[:1] == (str,)
        ):
            if isinstance(value, dict):
                vt = typing.get_args(args[0])[1]
                return tuple((str(k), _coerce(v, vt, f"{key}.{k}")) for k, v in value.items())
            if isinstance(value, (list, tuple)) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in value):
                return tuple((str(k), v) for k, v in value)
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis:
                value = [value]
            else:
                raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a float, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Builds dataclass ``cls`` from ``data``; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    for k, value in RETIRED_FIELDS.get(cls, {}).items():
        if k in data:
            if to_dict(data[k]) != to_dict(value):
                raise ConfigError(
                    f"{prefix}{k} has been removed; delete it from the config (only its old default "
                    f"{to_dict(value)!r} is still accepted)"
                )
            del data[k]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b.c=value`` strings (value parsed as YAML) onto a nested dict."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def read_config_file(path: Path) -> dict:
    """The mapping a YAML config file holds (an empty file: ``{}``); a missing file, invalid
    YAML or another top level is a one-line ConfigError naming the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def preset_model(preset: str, model_over: Any) -> ModelConfig:
    """The ModelConfig of ``model_preset`` with a config file's ``model`` keys over it (checked
    field by field, errors naming ``model.<key>``)."""
    if not isinstance(model_over, dict):
        raise ConfigError(f"model: expected a mapping, got {type(model_over).__name__}")
    return from_dict(ModelConfig, {**to_dict(MODEL_PRESETS[preset]()), **model_over}, prefix="model.")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Loads a RunConfig from YAML; ``model`` is taken from ``model_preset`` unless given."""
    if path is not None:
        path = Path(path)
    data = apply_overrides(read_config_file(path) if path is not None else {}, overrides or [])
    preset = data.get("model_preset", RunConfig.model_preset)
    _check_preset(preset)
    model_over = data.pop("model", {}) or {}
    try:
        # the model first: the cross-field checks of RunConfig (lora.top_layers <= model.n_layers...)
        # then see the run's model, and every field is checked here, before any work
        model = preset_model(preset, model_over)
        return from_dict(RunConfig, {**data, "model": model})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def run_config_of(run_dir: str | Path) -> RunConfig:
    """The resolved config a run directory was made with (its ``config.yaml``), verified against
    the ``config_hash`` recorded in it: a hand-edited value of the run's identity is refused (a
    field that changes only speed, outside the identity, may be edited)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; {run_dir} is not a malt-jax run directory")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    recorded = data.pop("config_hash", None)
    if not recorded:
        raise ConfigError(f"{path}: no config_hash recorded; the file was edited or is not a malt-jax stamp")
    model = data.pop("model", {}) or {}
    try:
        if not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping, got {type(model).__name__}")
        cfg = from_dict(RunConfig, {**data, "model": from_dict(ModelConfig, model, prefix="model.")})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.hash() != str(recorded):
        raise ConfigError(
            f"{path}: edited after the run was made (its values hash to {cfg.hash()}, the recorded "
            f"config_hash is {recorded}); restore the file, or start a new run_dir for the new values"
        )
    return cfg
