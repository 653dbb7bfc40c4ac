"""Every field of every config dataclass is validated when a config is loaded, before any work.

``BAD`` lists, for each dotted key of :class:`RunConfig` (found with ``dataclasses.fields``,
recursively), values that must be refused with a ConfigError naming the key. A field added later
without an entry here (and so, probably, without a check) fails ``test_every_field_has_bad_values``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import typing
from pathlib import Path

import pytest
import yaml

from malt_jax.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SamplingConfig,
    load_run_config,
    run_config_of,
)
from malt_jax.training.pretrain_config import PretrainConfig, load_pretrain_config

REPO = Path(__file__).resolve().parents[1]

MAYBE = "maybe"  # not a bool
BAD: dict[str, list] = {
    "name": ["", "a/b"],
    "model_preset": ["gpt-5"],
    "weights": [""],
    "run_dir": [""],
    "mesh": [{"data": 0}, {"gpu": 2}, {"data": -1, "fsdp": -1}, {"data": "x"}],
    "results": [[1]],
    "model.vocab_size": [0],
    "model.dim": [0, "wide"],
    "model.n_layers": [0],
    "model.n_heads": [0],
    "model.n_kv_heads": [0],
    "model.head_dim": [-1],
    "model.hidden_dim": [0],
    "model.norm_eps": [0.0, 1.5],
    "model.rope_theta": [-1.0],
    "model.rope_scaling": [
        {"factor": 8.0},
        {"factor": 0.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.0},
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192.0},
    ],
    "model.tie_embeddings": [MAYBE],
    "model.max_seq_len": [0],
    "model.dtype": ["float16"],
    "model.remat": [MAYBE],
    "model.param_dtype": ["int8"],
    "model.arch": ["gemma"],
    "task.name": ["", "  "],
    "task.path": [[1]],
    "task.num_train": [0],
    "task.num_eval": [0],
    "task.seed": [-1],
    "task.options": [[1, 2]],
    "task.framing": ["dialogue"],
    "sampling.temperature": [-0.1],
    "sampling.top_k": [-1, 10**6],
    "sampling.top_p": [0.0, -0.5, 1.5],
    "sampling.max_new_tokens": [0],
    "sampling.role_max_new_tokens": [[8, 8], [8, 0, 8]],
    "sampling.greedy": [MAYBE],
    "sampling.compact_levels": [-1],
    "tree.n": [0],
    "tree.m": [0],
    "tree.l": [0],
    "tree.questions_per_batch": [0],
    "tree.share_prefix": [MAYBE],
    "tree.critique": [MAYBE],  # false with tree.m > 1: tests/test_no_critique_run.py
    "lora.rank": [0],
    "lora.alpha": [0.0, -16.0],
    "lora.targets": [["wq", "wx"], [], ["wq", "wq"]],
    "lora.top_layers": [-1, 31],  # the default model has 30 layers
    "train.learning_rate": [-1e-4],
    "train.warmup_ratio": [1.0, -0.1],
    "train.weight_decay": [-0.1],
    "train.grad_clip": [-1.0],
    "train.batch_size": [0],
    "train.grad_accum": [0, 3],  # 3 does not divide the default batch_size 8
    "train.sft_epochs": [-1],
    "train.dpo_epochs": [-1],
    "train.early_stop_patience": [-1],
    "train.dpo_learning_rate": [-1.0],
    "train.dpo_beta": [0.0, -0.2],
    "train.dpo_loss": ["hinge"],
    "train.label_smoothing": [0.5, -0.1],
    "train.rpo_alpha": [-0.5],
    "train.max_seq_len": [1],
    "train.value_threshold": [1.5, -0.5],
    "train.max_pairs_per_parent": [-1],
    "train.generator_dpo": [MAYBE],
    "train.verifier_balance": [MAYBE],
    "train.heldout_fraction": [1.0, -0.1],
    "train.heldout_report_fraction": [1.0, -0.1],
    "train.max_sft_examples": [-1],
    "train.max_dpo_pairs": [-1],
    "train.checkpoint_every": [0],
    "train.seed": [-1],
    "train.dpo_reference": ["policy"],
    "train.dpo_shared_prompt": [MAYBE],
    "train.unstack_layers": [MAYBE],
    "eval.votes": [0],
    "eval.batch_questions": [-1],
    "eval.temperature": [-1.0],
    "eval.max_new_tokens": [0],
    "eval.bootstrap_samples": [0],
    "eval.seed": [-1],
    "eval.sft_chain": [MAYBE],
    "eval.ablations": [MAYBE],
    "study.train_sizes": [[0], [4, 4], [64]],  # 64 > the default task.num_train 32
    "study.results": [[1]],
    "study.sft_chain": ["some"],
    "rl.iterations": [-1],
    "rl.questions_per_iteration": [0],
    "rl.learning_rate": [0.0, -1e-5],
    "rl.kl_coef": [-0.1],
    "rl.clip_eps": [0.0, -0.2],
    "rl.updates_per_iteration": [0],
    "rl.baseline": ["median"],
    "rl.normalize": ["mad"],
    "rl.loss_agg": ["sum"],
    "rl.reference": ["policy"],
    "rl.sft_run": [[1], "runs/sft"],  # a run directory only with rl.reference: sft
    "rl.roles": [["X"], [], ["G", "G"]],
    "rl.agents": ["both", "G"],  # "multi" or "single" (with rl.roles [G]: tests/test_rl_single.py)
    "rl.token_budget": [-1],
    "rl.checkpoint_every": [0],
    "rl.seed": [-1],
    "rl.micro_batch": [0],
    "rl.eval_every": [-1],
    "rl.eval_questions": [0],
    "iterate.rounds": [0, -1],
    "iterate.init": ["scratch"],
    "iterate.thresholds": [[1.5], [-0.1], [0.5, 0.6], ["high"]],  # [0.5, 0.6]: 2 thresholds, 1 round
    "iterate.stop_on_no_gain": [MAYBE],
    "iterate.val_questions": [0],
}


def _field_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _field_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _float_keys() -> list[str]:
    out = []
    for key in _field_keys():
        cls: type = RunConfig
        *sections, name = key.split(".")
        for s in sections:
            cls = typing.get_type_hints(cls)[s]
        if typing.get_type_hints(cls)[name] is float:
            out.append(key)
    return out


CASES = [(k, v) for k, values in BAD.items() for v in values]


def _named(err: Exception, key: str) -> bool:
    return str(err).startswith((key + ":", key + " ", key + ".", key + "["))  # or an item of it


def _assert_cases_cover(keys: list[str], bad: dict, what: str) -> None:
    """Every field key has a validation case in ``bad`` and every case a field."""
    missing = [k for k in keys if k not in bad]
    assert not missing, f"{what} fields without a validation case (and probably a check): {missing}"
    assert not set(bad) - set(keys), f"stale cases: {sorted(set(bad) - set(keys))}"


def _assert_refused_at_load(load, key: str, value) -> None:
    """``load(None, ["key=value"])`` raises a one-line ConfigError naming ``key``."""
    with pytest.raises(ConfigError) as info:
        load(None, [f"{key}={json.dumps(value)}"])
    assert _named(info.value, key), str(info.value)
    assert "\n" not in str(info.value)


def test_every_field_has_bad_values():
    keys = _field_keys()
    assert len(keys) > 60
    _assert_cases_cover(keys, BAD, "config")


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={json.dumps(v)}" for k, v in CASES])
def test_bad_value_is_refused_at_load_naming_the_key(key, value):
    _assert_refused_at_load(load_run_config, key, value)


def _py(value):
    """A YAML value as the loader hands it to the dataclass (lists -> tuples, mappings -> pairs)."""
    if isinstance(value, dict):
        return tuple((k, _py(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_py(v) for v in value)
    return value


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={json.dumps(v)}" for k, v in CASES])
def test_bad_value_is_refused_by_the_dataclass_itself(key, value):
    """Configs built in code (library use, ``dataclasses.replace``) are checked the same way."""
    if key == "model_preset" or key == "mesh" and value == {"data": "x"} or key == "task.options":
        value = {"model_preset": "gpt-5", "mesh": {"data": "x"}, "task.options": [1, 2]}[key]
    base = RunConfig()
    *sections, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        if sections:
            section = getattr(base, sections[0])
            dataclasses.replace(base, **{sections[0]: dataclasses.replace(section, **{name: _py(value)})})
        else:
            dataclasses.replace(base, **{name: _py(value)})
    assert _named(info.value, key), str(info.value)


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match="finite") as info:
        load_run_config(None, [f"{key}={value}"])
    assert _named(info.value, key), str(info.value)


def test_float_keys_cover_the_sampling_knobs():
    assert {"sampling.top_p", "sampling.temperature", "eval.temperature", "lora.alpha", "train.dpo_beta"} <= set(
        _float_keys()
    )


def test_messages_name_the_file_and_the_limits(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"top_p": 0.0}}))
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == f"{path}: sampling.top_p: expected 0 < top_p <= 1, got 0.0"
    path.write_text(yaml.safe_dump({"model": {"dim": 0}}))
    with pytest.raises(ConfigError, match=f"^{path}: model.dim: expected a positive int"):
        load_run_config(path)


def test_cross_field_checks_see_the_run_model():
    # a 32-layer preset may adapt all its layers, though the default model (30 layers) has fewer
    cfg = load_run_config(None, ["model_preset=llama-3.1-8b", "lora.top_layers=32"])
    assert cfg.lora.top_layers == 32 and cfg.model.n_layers == 32
    with pytest.raises(ConfigError, match="^lora.top_layers: .*model.n_layers=32, got 33"):
        load_run_config(None, ["model_preset=llama-3.1-8b", "lora.top_layers=33"])
    with pytest.raises(ConfigError, match="^lora.top_layers: .*model.n_layers=2"):
        load_run_config(None, ["model_preset=tiny", "lora.top_layers=3"])
    with pytest.raises(ConfigError, match="^lora.top_layers"):
        dataclasses.replace(RunConfig(), lora=LoraConfig(top_layers=31))
    with pytest.raises(ConfigError, match="^sampling.top_k: .*model.vocab_size=256"):
        load_run_config(None, ["model_preset=tiny", "sampling.top_k=257"])
    # the valid edges load
    load_run_config(
        None, ["sampling.top_p=1.0", "mesh={data: -1, tensor: 2}", "train.grad_accum=8", "lora.top_layers=30"]
    )


def test_valid_values_pass_and_types_stay_unchanged():
    cfg = load_run_config(None, ["sampling.top_p=0.9", "lora.alpha=8", "model.norm_eps=1e-6"])
    assert cfg.sampling.top_p == 0.9 and cfg.lora.alpha == 8.0 and cfg.model.norm_eps == 1e-6
    assert SamplingConfig(temperature=0) and ModelConfig.tiny()


def test_run_config_of_refuses_a_bad_config_yaml_naming_it(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"config_hash": "x", "eval": {"bootstrap_samples": 0}}))
    with pytest.raises(ConfigError) as info:
        run_config_of(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.yaml'}: eval.bootstrap_samples")


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "experiments" / "*.yaml"))), ids=lambda p: Path(p).name)
def test_shipped_configs_and_overlays_still_load(path):
    from malt_jax.planning.units import overlay_overrides

    if path.endswith("_pretrain.yaml"):  # a `malt-jax pretrain` config
        assert load_pretrain_config(path).train.steps >= 1
        return
    cfg = load_run_config(path)
    assert math.isfinite(cfg.sampling.top_p)
    for overlay in sorted(glob.glob(str(REPO / "tpu_configs" / "*.yaml"))):
        load_run_config(path, overlay_overrides(overlay))


# ``malt-jax pretrain`` configs (training/pretrain_config.py): the same rule, every field of
# PretrainConfig (model.* as in a run config) refused at load naming its key.
PRETRAIN_BAD: dict[str, list] = {
    **{k: v for k, v in BAD.items() if k.startswith("model.") and k != "model.vocab_size"},
    "model.vocab_size": [0, 100],  # a char tokenizer has at least 101 tokens
    "name": ["", "a/b"],
    "out_dir": ["", "  "],
    "model_preset": ["gpt-5"],
    "mesh": [{"data": 0}, {"gpu": 2}, {"data": -1, "fsdp": -1}, {"data": "x"}],
    "tokenizer.kind": ["wordpiece"],
    "tokenizer.vocab_size": [-1, 300],  # 300 != model.vocab_size 256
    "tokenizer.path": ["x.json"],  # a path only with kind: file
    "tokenizer.sample_docs": [0],
    "corpus.name": ["", " "],
    "corpus.options": [[1, 2]],
    "train.steps": [0],
    "train.batch_size": [0],
    "train.seq_len": [1, 513],  # the tiny preset's max_seq_len is 512
    "train.learning_rate": [0.0, -1e-3],
    "train.warmup_steps": [-1, 300],  # not below the default 300 steps
    "train.min_lr_ratio": [-0.1, 1.5],
    "train.weight_decay": [-0.1],
    "train.grad_clip": [-1.0],
    "train.eval_every": [0],
    "train.eval_batches": [0],
    "train.checkpoint_every": [0],
    "train.seed": [-1],
}
PRETRAIN_CASES = [(k, v) for k, values in PRETRAIN_BAD.items() for v in values]


def test_every_pretrain_field_has_bad_values():
    _assert_cases_cover(_field_keys(PretrainConfig), PRETRAIN_BAD, "pretrain config")


@pytest.mark.parametrize("key,value", PRETRAIN_CASES, ids=[f"{k}={json.dumps(v)}" for k, v in PRETRAIN_CASES])
def test_bad_pretrain_value_is_refused_at_load_naming_the_key(key, value):
    _assert_refused_at_load(load_pretrain_config, key, value)


def test_pretrain_config_defaults_and_kind_file_load():
    cfg = load_pretrain_config(None, [])
    assert cfg == PretrainConfig() and cfg.model.vocab_size == cfg.vocab_size == 256
    cfg = load_pretrain_config(None, ["tokenizer.kind=file", "tokenizer.path=smollm2", "model.vocab_size=49152"])
    assert cfg.tokenizer.path == "smollm2"
    with pytest.raises(ConfigError, match="^tokenizer.path"):
        load_pretrain_config(None, ["tokenizer.kind=file"])
    # the mesh places the same computation: not part of the run's identity
    assert load_pretrain_config(None, ["mesh={data: 2}"]).hash() == cfg.__class__().hash()
