"""Small shared test helpers."""

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax.model.llama import init_params

# a tiny run of the parity task (tests/parity_task.py): random ``tiny`` model, 4 training
# questions, trees of 2x2x2, one epoch per stage, 6 evaluation questions
TINY_RUN = """
name: {name}
model_preset: tiny
weights: random
run_dir: {run_dir}
task: {{name: "{task}", num_train: 4, num_eval: 6, options: {{train_split: train, eval_split: test}}}}
sampling: {{temperature: 1.0, max_new_tokens: 6}}
tree: {{n: 2, m: 2, l: 2, questions_per_batch: 2}}
lora: {{rank: 2, targets: [wq, wv]}}
train: {{sft_epochs: 1, dpo_epochs: 1, batch_size: 4, max_seq_len: 128, checkpoint_every: 2}}
eval: {{votes: 3, max_new_tokens: 6, bootstrap_samples: 200}}
"""


def write_tiny_config(
    path: Path, run_dir: Path, name: str = "tiny", task: str = "tests.parity_task:ParityTask", extra: str = ""
) -> Path:
    """Writes :data:`TINY_RUN` (``extra``: further YAML lines) to ``path``; returns ``path``."""
    path.write_text(TINY_RUN.format(name=name, run_dir=run_dir, task=task) + extra)
    return path


def finished_tiny_run(tmp: Path):
    """A tiny parity run (``tmp/cfg.yaml``) through every stage into ``tmp/out``: its RunConfig,
    the random model and the pipeline's summary."""
    from malt_jax.config import load_run_config
    from malt_jax.model.base_model import load_model
    from malt_jax.workflows import pipeline
    from tests.parity_task import ParityTask

    cfg = load_run_config(write_tiny_config(tmp / "cfg.yaml", tmp / "out", task="parity"))
    model = load_model("random", cfg.model)
    return cfg, model, pipeline.run(cfg, model=model, task=ParityTask(), progress=False)


def numpy_random_params(cfg, std: float = 0.3, seed: int = 0):
    """Random base parameters drawn with NumPy (no compile). std 0.3 (not 0.02): frozen embeddings
    need a usable logit range for LoRA to memorise anything."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0, std, s.shape) if len(s.shape) > 1 else np.ones(s.shape), jnp.float32),
        shapes,
    )


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    **{f"self_attn.{n}_proj.{kind}": f"attn_{n}.{kind}" for n in "qkv" for kind in ("weight", "bias")},
    **{f"self_attn.{n}_norm.weight": f"attn_{n}_norm.weight" for n in "qk"},
}


def write_gguf(path, cfg, hf: dict, quantize: bool = False):
    """Writes Hugging Face tensors ``hf`` as a GGUF file of ``cfg.arch`` the way llama.cpp's
    converter does: Q/K rows permuted for llama (interleaved rope; qwen2/qwen3 use rotate-half),
    2-D tensors optionally Q8_0-quantized."""
    import gguf
    from gguf import quants

    from malt_jax.model import weights

    w = gguf.GGUFWriter(str(path), cfg.arch)
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_context_length(cfg.max_seq_len)
    w.add_vocab_size(cfg.vocab_size)
    for name, arr in hf.items():
        arr = np.asarray(arr, np.float32)
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            g = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            g = f"blk.{i}.{_GGUF_NAMES[rest]}"
            if cfg.arch == "llama" and rest == "self_attn.q_proj.weight":
                arr = weights.gguf_permute(arr, cfg.n_heads)
            if cfg.arch == "llama" and rest == "self_attn.k_proj.weight":
                arr = weights.gguf_permute(arr, cfg.n_kv_heads)
        if quantize and arr.ndim == 2:
            q = quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# malt-jax rl on the tiny parity run: 2 iterations of 2 questions (trees 2x2x2), fresh adapters
RL = ["rl.iterations=2", "rl.reference=base", "rl.questions_per_iteration=2", "rl.learning_rate=1e-2"]
# the single-agent GRPO baseline (rl.agents: single): G alone, RL_SINGLE_N answers per question
RL_SINGLE_N = 4
RL_SINGLE = [*RL, "rl.agents=single", "rl.roles=[G]", f"tree.n={RL_SINGLE_N}"]


def tiny_model():
    """The random ``tiny`` model whose adapters the RL tests train."""
    from malt_jax.config import load_run_config
    from malt_jax.model.base_model import load_model

    return load_model("random", load_run_config(None, ["model_preset=tiny"]).model)


def rl_config(tmp: Path, overrides: Sequence[str], run: str = "out", extra: Sequence[str] = ()):
    """The tiny parity run ``tmp/<run>`` (its config ``tmp/<run>.yaml``) with the RL
    ``overrides`` (:data:`RL`, :data:`RL_SINGLE`) and ``extra`` ones."""
    from malt_jax.config import load_run_config

    path = write_tiny_config(tmp / f"{run}.yaml", tmp / run, task="parity")
    return load_run_config(path, [*overrides, *extra])


def uninterrupted_rl(cfg, model) -> tuple:
    """``cfg``'s RL run from start to end (no evaluation of the final adapters): ``(cfg, summary)``."""
    from malt_jax.workflows.rl import run_rl
    from tests.parity_task import ParityTask

    return cfg, run_rl(cfg, model=model, task=ParityTask(), progress=False, evaluate=False)


def rl_metric_rows(run_dir: Path) -> list[dict]:
    """The metrics rows of a ``malt-jax rl`` run (``<run>/rl/metrics.jsonl``)."""
    return [json.loads(line) for line in (Path(run_dir) / "rl" / "metrics.jsonl").read_text().splitlines()]


def experiment_module(name: str, path: str) -> ModuleType:
    """A script of ``experiments/`` (not a package) loaded as a module, by its path from the
    repository root."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def snapshot(d: Path) -> dict[str, str]:
    """Every file under ``d`` -> its sha256: equal snapshots = nothing written or removed."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


def hand_trees(rewards, g_correct, empty_critique: bool = False) -> dict:
    """Expansion trees of 1-token outputs for the credit stage's tests: G i -> token 10+i, V (i,j)
    -> 20+j, R (i,j,k) -> 30+k. ``empty_critique``: V's level left empty (zero-length critiques,
    ``tree.critique: false``)."""
    Q, n, m, l = rewards.shape
    tok = lambda base, shape: (base + np.indices(shape)[-1])[..., None]  # noqa: E731
    v_tokens = np.zeros((Q, n, m, 3), int) if empty_critique else tok(20, (Q, n, m))
    return {
        "q_tokens": np.full((Q, 4), 5),
        "q_lens": np.full((Q,), 4),
        "rewards": rewards,
        "G_tokens": tok(10, (Q, n)),
        "G_lengths": np.ones((Q, n), int),
        "G_stopped": np.ones((Q, n), bool),
        "V_tokens": v_tokens,
        "V_lengths": np.full((Q, n, m), 0 if empty_critique else 1, int),
        "V_stopped": np.ones((Q, n, m), bool),
        "R_tokens": tok(30, (Q, n, m, l)),
        "R_lengths": np.ones((Q, n, m, l), int),
        "R_stopped": np.ones((Q, n, m, l), bool),
        "G_correct": g_correct,
    }
