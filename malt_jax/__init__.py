"""malt-jax: JAX-native MALT (Multi-Agent LLM Training).

The pipeline, one module per stage::

    tasks/ (data, prompts, grading) -> model/ (Llama, weights, tokenizer, LoRA)
      -> sampling.py -> expansion.py (G -> V -> R trees) -> credit.py (value iteration, labels)
      -> losses.py + train.py (SFT, DPO) -> evaluate.py + report.py
    stages/{expand,credit,train,eval}.py run each step over a run directory (rundir.py);
    pipeline.run runs them all.

Public API (a small set of names; everything else is importable from its module)::

    model = malt_jax.load_model("smollm2")                 # base model + tokenizer
    task = malt_jax.get_task("synthetic", max_value=9, steps=1)
    malt_jax.sample_trees(model, codec, questions, spec, seed=0, batch_size=4, on_batch=...)  # G -> V -> R trees
    values = malt_jax.assign_credit(rewards)                 # [Q, n, m, l] -> node values + labels
    result = malt_jax.train_role(params, cfg, lora_cfg, train_cfg, sft, dpo, "verifier", ckpt_dir,
                                 sft_heldout=..., dpo_heldout=...)   # RoleTraining: adapter, epochs, ...
    ev = malt_jax.run_eval(cfg, model, task, questions, run_dir, adapters, [malt_jax.System(...)])
    summary = malt_jax.run(malt_jax.load_run_config("experiments/smollm2_synthetic.yaml"))
    curve = malt_jax.run_study(malt_jax.load_run_config("experiments/study_synthetic.yaml"))
    rounds = malt_jax.run_iterative(malt_jax.load_run_config(path, ["iterate.rounds=3"]))  # iterative MALT
    answer = malt_jax.ask_run("runs/smollm2_synthetic", "What is 42 - 17?", votes=3)   # the trained team
    malt_jax.export_run("runs/smollm2_synthetic", "exported", "both")   # PEFT folders + merged checkpoints
    malt_jax.pretrain(malt_jax.load_pretrain_config("experiments/pretrain/testbed_tiny.yaml"))  # -> model dir

The README's "Library use" example goes through every stage with these names.
"""

from malt_jax.config import (
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    TaskConfig,
    TrainConfig,
    TreeConfig,
    load_run_config,
)
from malt_jax.credit.values import assign_credit, dpo_pairs, sft_indices
from malt_jax.model.base_model import Model, load_model
from malt_jax.roles import ROLE_NAMES, ROLES
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.decode import StopCriteria, generate
from malt_jax.sampling.expansion import Contexts, ExpansionSpec, expand
from malt_jax.stages.credit import build_datasets
from malt_jax.stages.eval import System, run_eval
from malt_jax.stages.expand import decode_tree, grade_leaves, sample_trees
from malt_jax.tasks import Example, Task, get_task
from malt_jax.training.data import DPOExample, SFTExample
from malt_jax.training.pretrain import pretrain
from malt_jax.training.pretrain_config import PretrainConfig, load_pretrain_config
from malt_jax.training.role import RoleTraining, train_role
from malt_jax.workflows.ask import ask, ask_run
from malt_jax.workflows.export import export_run, load_peft, save_peft
from malt_jax.workflows.iterate import run_iterative
from malt_jax.workflows.pipeline import run
from malt_jax.workflows.study import run_study

__version__ = "0.1.0"

__all__ = [
    "Contexts",
    "DPOExample",
    "EvalConfig",
    "ExpansionSpec",
    "Example",
    "LoraConfig",
    "Model",
    "ModelConfig",
    "PretrainConfig",
    "PromptCodec",
    "ROLES",
    "ROLE_NAMES",
    "RoleTraining",
    "RunConfig",
    "SFTExample",
    "SamplingConfig",
    "StopCriteria",
    "System",
    "Task",
    "TaskConfig",
    "TrainConfig",
    "TreeConfig",
    "ask",
    "ask_run",
    "export_run",
    "load_peft",
    "save_peft",
    "assign_credit",
    "build_datasets",
    "decode_tree",
    "dpo_pairs",
    "expand",
    "generate",
    "get_task",
    "grade_leaves",
    "load_model",
    "load_run_config",
    "load_pretrain_config",
    "pretrain",
    "run",
    "run_eval",
    "run_iterative",
    "run_study",
    "sample_trees",
    "sft_indices",
    "train_role",
]
