"""The four MALT stages, in data-flow order; each reads what the one before wrote into the run
directory (:mod:`malt_jax.rundir`) and skips work already done.

    expand (stages.expand) -> credit (stages.credit) -> train (stages.train) -> eval (stages.eval)
"""

from malt_jax.stages.credit import run_credit
from malt_jax.stages.eval import run_eval
from malt_jax.stages.expand import run_expand
from malt_jax.stages.train import run_train

__all__ = ["run_expand", "run_credit", "run_train", "run_eval"]
