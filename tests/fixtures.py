"""Small shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.model.llama import init_params


def numpy_random_params(cfg, std: float = 0.3, seed: int = 0):
    """Random base parameters drawn with NumPy (no compile). std 0.3 (not 0.02): frozen embeddings
    need a usable logit range for LoRA to memorise anything."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape) if len(s.shape) > 1 else np.ones(s.shape),
                                              jnp.float32), shapes)
