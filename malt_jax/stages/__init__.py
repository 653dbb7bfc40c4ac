"""The four MALT stages over a run directory, in data-flow order; each reads what the one before
wrote (``rundir``): trajectory expansion (``expand``), credit assignment into per-role datasets
(``credit``), LoRA training per role (``train``) and evaluation of every system (``eval``).
``rl`` holds the pieces of one iteration of online multi-agent GRPO (``malt-jax rl``).

Layer 6: may import every lower layer (``sampling``, ``credit``, ``training``, ``evaluation``,
``tasks``, ``model``, ``parallel``, ``config``, ``roles``, ``runtime``), not ``planning`` nor
``workflows``.
"""

from malt_jax.stages.credit import run_credit
from malt_jax.stages.eval import run_eval
from malt_jax.stages.expand import run_expand
from malt_jax.stages.train import run_train

__all__ = ["run_expand", "run_credit", "run_train", "run_eval"]
