"""The base model every role shares: parameters, model config and tokenizer, loaded once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from malt_jax.config import ModelConfig
from malt_jax.model.llama import Params, init_params
from malt_jax.model.tokenizer import Tokenizer

__all__ = ["Model", "load_model"]


@dataclasses.dataclass
class Model:
    params: Params
    cfg: ModelConfig
    tokenizer: Tokenizer


def load_model(weights: str = "smollm2", cfg: ModelConfig | None = None, seed: int = 0) -> Model:
    """Loads the base model and its tokenizer.

    ``weights``: ``"smollm2"`` (embedded default), a ``.gguf`` file, a Hugging Face directory,
    or ``"random"`` (random weights of ``cfg``, with the SmolLM2 tokenizer; for tests).
    """
    from malt_jax.model.files import smollm2_gguf_path
    from malt_jax.model.tokenizer import load_tokenizer
    from malt_jax.model.weights import load_weights

    if weights == "random":
        tok = load_tokenizer(smollm2_gguf_path())
        cfg = dataclasses.replace(cfg or ModelConfig.tiny(), vocab_size=tok.vocab_size)
        return Model(init_params(cfg, jax.random.key(seed)), cfg, tok)
    src = smollm2_gguf_path() if weights == "smollm2" else Path(weights)
    params, loaded = load_weights(src, None)
    if cfg is not None:  # shapes come from the checkpoint, runtime choices from the config
        loaded = dataclasses.replace(loaded, dtype=cfg.dtype, remat=cfg.remat)
    return Model(params, loaded, load_tokenizer(src))
