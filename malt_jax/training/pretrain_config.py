"""The configuration of ``malt-jax pretrain``: typed, frozen dataclasses checked field by field
when built (every error is a one-line :class:`~malt_jax.config.ConfigError` naming the dotted
key), YAML loading and ``key=value`` overrides, as :func:`malt_jax.config.load_run_config`.

    name: testbed_tiny
    out_dir: models/testbed_tiny          # the model directory pretraining writes
    model_preset: tiny                    # then model.* overrides, as in a run config
    model: {vocab_size: 384, dim: 128, n_layers: 4}
    tokenizer: {kind: bytelevel}          # trained on the corpus, model.vocab_size tokens
    corpus: {name: arith, options: {seed: 0}}
    train: {steps: 300, batch_size: 16, seq_len: 128, learning_rate: 3.0e-3}
    mesh: {data: -1}                      # optional; default all devices on data

Loading imports no JAX.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from malt_jax.config import (
    ConfigError,
    ModelConfig,
    _check,
    _check_mesh,
    _check_min,
    _check_preset,
    _check_types,
    apply_overrides,
    config_hash,
    from_dict,
    preset_model,
    read_config_file,
    to_dict,
)

__all__ = [
    "CorpusSpec",
    "PretrainConfig",
    "PretrainTrainConfig",
    "TokenizerSpec",
    "load_pretrain_config",
    "pretrain_config_dict",
]

# minimum vocabularies of the trained kinds (model/small_tokenizer.min_vocab_size; kept here so that
# loading a config imports no tokenizer code)
MIN_VOCAB = {"bytelevel": 259, "char": 101}


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """The model's tokenizer: trained on the corpus (``bytelevel`` or ``char`` BPE of
    ``vocab_size`` tokens, 0 = ``model.vocab_size``) from ``sample_docs`` training documents, or
    an existing one (``kind: file``, ``path``: a tokenizer.json, a directory holding one, a
    ``.gguf`` file or ``smollm2``)."""

    kind: Literal["bytelevel", "char", "file"] = "char"
    vocab_size: int = 0
    path: str = ""
    sample_docs: int = 2000

    def __post_init__(self) -> None:
        _check_types("tokenizer", self)
        _check_min("tokenizer", self, vocab_size=0, sample_docs=1)
        if self.kind == "file":
            _check("tokenizer", self, "path", bool(self.path.strip()), "a tokenizer file or directory (kind: file)")
        else:
            _check("tokenizer", self, "path", not self.path, f"no path with kind {self.kind} (it is trained)")
            _check(
                "tokenizer",
                self,
                "vocab_size",
                self.vocab_size == 0 or self.vocab_size >= MIN_VOCAB[self.kind],
                f"0 (= model.vocab_size) or >= {MIN_VOCAB[self.kind]} for a {self.kind} tokenizer",
            )


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """The training text: a corpus of ``training/corpus.py`` (``get_corpus(name, **options)``)."""

    name: str = "arith"
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check_types("corpus", self)
        _check("corpus", self, "name", bool(self.name.strip()), "a corpus name")
        keys = [k for k, _ in self.options]
        _check("corpus", self, "options", len(set(keys)) == len(keys), "a mapping without repeated keys")


@dataclasses.dataclass(frozen=True)
class PretrainTrainConfig:
    """Full-parameter AdamW: ``steps`` updates of ``batch_size`` packed rows of ``seq_len`` tokens,
    linear warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * learning_rate``;
    held-out loss on ``eval_batches`` validation batches every ``eval_every`` steps; a checkpoint
    every ``checkpoint_every`` steps. ``seed`` seeds the initial parameters."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        _check_types("train", self)
        _check_min(
            "train",
            self,
            steps=1,
            batch_size=1,
            seq_len=2,
            warmup_steps=0,
            weight_decay=0,
            grad_clip=0,
            eval_every=1,
            eval_batches=1,
            checkpoint_every=1,
            seed=0,
        )
        _check("train", self, "learning_rate", self.learning_rate > 0, "learning_rate > 0")
        _check("train", self, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "0 <= min_lr_ratio <= 1")
        _check(
            "train", self, "warmup_steps", self.warmup_steps < self.steps, f"warmup_steps < train.steps={self.steps}"
        )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    name: str = "pretrain"
    out_dir: str = dataclasses.field(default="models/pretrain", metadata={"identity": False})  # where, not what
    model_preset: str = "tiny"
    model: ModelConfig = ModelConfig.tiny()
    tokenizer: TokenizerSpec = TokenizerSpec()
    corpus: CorpusSpec = CorpusSpec()
    train: PretrainTrainConfig = PretrainTrainConfig()
    # e.g. {data: 2, fsdp: 4}; empty = every device on "data". Placement only: not identity.
    mesh: tuple[tuple[str, int], ...] = dataclasses.field(default=(), metadata={"identity": False})

    def __post_init__(self) -> None:
        _check_types("", self)
        for name in ("name", "out_dir"):
            _check("", self, name, bool(getattr(self, name).strip()), "a non-empty string")
        _check("", self, "name", not set(self.name) & set("/\\"), "a name without path separators")
        _check_preset(self.model_preset)
        _check_mesh(self)
        vocab_size = self.model.vocab_size
        tokenizer_ok = self.tokenizer.vocab_size in (0, vocab_size)
        expected = f"0 or model.vocab_size={vocab_size} (the model's embedding rows)"
        _check("tokenizer", self.tokenizer, "vocab_size", tokenizer_ok, expected)
        if self.tokenizer.kind != "file" and self.model.vocab_size < MIN_VOCAB[self.tokenizer.kind]:
            raise ConfigError(
                f"model.vocab_size: a trained {self.tokenizer.kind} tokenizer has at least "
                f"{MIN_VOCAB[self.tokenizer.kind]} tokens, got {self.model.vocab_size}"
            )
        max_len = self.model.max_seq_len
        _check("train", self.train, "seq_len", self.train.seq_len <= max_len, f"<= model.max_seq_len={max_len}")

    @property
    def vocab_size(self) -> int:
        """The vocabulary the tokenizer must have (= ``model.vocab_size``)."""
        return self.model.vocab_size

    def hash(self) -> str:
        """The run's identity (out_dir and mesh excluded: where it is written, how it is placed)."""
        return config_hash(self)


def pretrain_config_dict(cfg: PretrainConfig) -> dict:
    """Plain-dict form (for YAML / JSON records)."""
    return to_dict(cfg)


def load_pretrain_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Loads a PretrainConfig from YAML plus ``key=value`` overrides; ``model`` starts from
    ``model_preset`` (default ``tiny``) and takes the file's ``model`` keys over it."""
    if path is not None:
        path = Path(path)
    data = read_config_file(path) if path is not None else {}
    try:
        data = apply_overrides(data, overrides or [])
        preset = data.get("model_preset", PretrainConfig.model_preset)
        _check_preset(preset)
        model = preset_model(preset, data.pop("model", {}) or {})
        return from_dict(PretrainConfig, {**data, "model": model})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
