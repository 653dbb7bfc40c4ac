"""Experiment configs, TPU overlays and the per-device plan (``malt-jax plan``), all abstract."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from malt_jax import cli
from malt_jax.config import ModelConfig, load_run_config
from malt_jax.planning.flops import analytic_step_flops
from malt_jax.planning.memory import make_plan
from malt_jax.planning.plan import DEVICE_HBM, PlanError
from malt_jax.planning.units import GiB, overlay_overrides, parse_bytes, parse_mesh

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "tpu_configs").glob("*.yaml"))
PAPER_8B = [ROOT / "experiments" / f"llama31_8b_{t}.yaml" for t in ("gsm8k", "math", "csqa")]
GSM8K_8B = str(PAPER_8B[0])


def _prompt_tokens(path: Path) -> int:
    return 384 if "math" in path.name else 256


# ----------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
    cfg = load_run_config(path)  # unknown keys / bad types raise ConfigError
    assert cfg.name and cfg.run_dir
    assert all(k in ("data", "fsdp", "tensor") for k, _ in cfg.mesh)


def test_paper_setting_configs():
    tasks = set()
    for path in PAPER_8B:
        cfg = load_run_config(path)
        tasks.add(cfg.task.name)
        assert cfg.model_preset == "llama-3.1-8b" and cfg.model == ModelConfig.llama31_8b(remat=True)
        assert cfg.weights.startswith("/") and "Llama-3.1-8B-Instruct" in cfg.weights
        assert (cfg.tree.n, cfg.tree.m, cfg.tree.l) == (3, 3, 3)
        assert cfg.sampling.temperature == 0.3 and cfg.eval.temperature == 0.3
        assert cfg.train.dpo_beta == 0.2 and cfg.train.sft_epochs >= 1 and cfg.train.dpo_epochs >= 1
        assert cfg.eval.votes == 3
        assert dict(cfg.mesh) and np.prod([v for _, v in cfg.mesh]) == 8
        # the refiner's context (prompt + 3 turns of new tokens) fits the training length
        assert cfg.train.max_seq_len >= _prompt_tokens(path) + 3 * cfg.sampling.max_new_tokens + 64
    assert tasks == {"gsm8k", "math", "csqa"}
    one = load_run_config(ROOT / "experiments" / "llama32_1b_gsm8k.yaml")
    assert one.model_preset == "llama-3.2-1b" and np.prod([v for _, v in one.mesh]) == 1


def test_qwen_paper_config():
    cfg = load_run_config(ROOT / "experiments" / "qwen25_1p5b_gsm8k.yaml")
    from malt_jax.config import MODEL_PRESETS

    assert cfg.model == MODEL_PRESETS["qwen2.5-1.5b"](remat=True) and cfg.model.arch == "qwen2"
    assert cfg.task.name == "gsm8k" and (cfg.tree.n, cfg.tree.m, cfg.tree.l) == (3, 3, 3)
    assert cfg.train.dpo_beta == 0.2 and cfg.train.generator_dpo and cfg.train.batch_size == 8
    assert cfg.eval.votes == 3 and cfg.train.max_seq_len >= 256 + 3 * cfg.sampling.max_new_tokens + 64
    plan = make_plan(cfg, device="h100")
    assert plan.devices == 1 and plan.fits, plan.refusal()


def test_config_hashes_of_the_experiments_stay_the_same():
    """A run's identity must not change under refactors: run directories are matched by it. The
    retired ``sampling.stop_strings`` (never applied) stays in the identity at its only value, and
    a config naming it at that value still loads."""
    from malt_jax.config import ConfigError, RunConfig, to_dict

    assert RunConfig().hash() == "b1ba8bea3dda"
    assert load_run_config(GSM8K_8B).hash() == "25a5a1c2a66c"
    # the make malt run before the memory change (its batch sizes; results/ holds the re-run's hash)
    old_batches = ["tree.questions_per_batch=8", "eval.batch_questions=100"]
    assert load_run_config(ROOT / "experiments" / "smollm2_synthetic.yaml", old_batches).hash() == "50fb14493088"
    assert to_dict(RunConfig().sampling, identity_only=True)["stop_strings"] == []
    assert "stop_strings" not in to_dict(RunConfig().sampling)
    assert load_run_config(GSM8K_8B, ["sampling.stop_strings=[]"]).hash() == "25a5a1c2a66c"
    with pytest.raises(ConfigError, match="stop_strings has been removed"):
        load_run_config(GSM8K_8B, ["sampling.stop_strings=[Question:]"])


def test_overlay_overrides_flatten():
    ov = overlay_overrides(ROOT / "tpu_configs" / "v5p-64.yaml")
    assert 'mesh={"data":2,"fsdp":8,"tensor":2}' in ov  # one atomic value: replaces the whole mesh
    assert "train.batch_size=64" in ov and not any(o.startswith("plan") for o in ov)
    cfg = load_run_config(GSM8K_8B, ov)
    assert dict(cfg.mesh) == {"data": 2, "fsdp": 8, "tensor": 2} and cfg.train.grad_accum == 4


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_tpu_overlays_fit_their_experiments(overlay):
    """Each overlay fits the experiments it names (``plan.experiments``; default the 8B configs)."""
    import yaml

    meta = yaml.safe_load(overlay.read_text())["plan"]
    for path in [ROOT / p for p in meta.get("experiments", [])] or PAPER_8B:
        cfg = load_run_config(path, overlay_overrides(overlay))
        plan = make_plan(cfg, devices=meta["devices"], device=meta["device"], prompt_tokens=_prompt_tokens(path))
        assert plan.devices == meta["devices"]
        assert plan.fits, plan.refusal()


def test_parsers():
    assert parse_bytes("16GiB") == 16 * GiB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes(1024) == 1024
    assert parse_bytes("1.5 TiB") == int(1.5 * 1024**4)
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")
    assert parse_mesh("data=1,fsdp=8,tensor=1") == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="unknown axis"):
        parse_mesh("model=8")


# ----------------------------------------------------------------------------------------------
# the plan


def test_8b_on_v5p_fsdp8_fits_and_matches_hand_computed_bytes():
    cfg = load_run_config(GSM8K_8B)
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="v5p")
    assert plan.fits and plan.check() is plan and plan.device_memory == DEVICE_HBM["v5p"] == 95 * GiB
    m = cfg.model
    assert plan.n_params == 8_030_261_248  # Llama-3.1-8B
    norms = 2 * m.n_layers * m.dim + m.dim  # replicated RMSNorm weights; every matrix splits 8-way on embed
    assert plan.components["parameters"] == (plan.n_params - norms) * 2 // 8 + norms * 2
    assert plan.components["parameters"] == pytest.approx(8.03e9 * 2 / 8, rel=1e-3)
    # KV cache of the refiner level: 16 questions x 27 rows over 8 devices, bf16 k and v
    S = 256 + 3 * cfg.sampling.max_new_tokens + 2 * 32
    rows = cfg.tree.questions_per_batch * 27
    assert plan.details["cache_len"] == S
    assert plan.components["kv_cache"] == 2 * m.n_layers * (rows // 8) * m.n_kv_heads * S * m.head_dim * 2
    # LoRA: r * (in + out) per target per layer; Adam mu + nu mirror it
    r = cfg.lora.rank
    per_layer = r * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 3)
    assert plan.n_lora == m.n_layers * per_layer
    assert 0 < plan.components["optimizer"] - 2 * plan.components["adapter"] < 64  # + replicated scalars
    # activations with remat (the 8B config sets it): 1 SFT row per device keeps every layer's
    # input (T x L x D x bytes); the layer recomputed in the backward (T x (bytes * lin + H * T *
    # (4 + bytes))) is smaller than the logits (T x vocab x 4 B x 3), which are freed before it
    assert m.remat
    T, lin = cfg.train.max_seq_len, 4 * 4096 + 3 * 4096 + 3 * 1024 + 3 * 14336
    assert T * (2 * lin + 32 * T * 6) < T * 128256 * 12
    assert plan.components["activations"] == T * m.n_layers * 4096 * 2
    assert plan.components["activations_dpo"] == 2 * plan.components["activations"]
    no_remat = make_plan(
        dataclasses.replace(cfg, model=dataclasses.replace(m, remat=False)), mesh="data=1,fsdp=8,tensor=1", device="v5p"
    )
    assert no_remat.components["activations"] == T * m.n_layers * (2 * lin + 32 * T * 6)
    # DPO: one row of up to 2T tokens per pair (the prompt once): the same linear activations as
    # two rows of T, twice the attention's; with a row per completion, exactly twice SFT's
    assert no_remat.details["dpo_rows"] == no_remat.details["sft_rows"] and no_remat.details["dpo_seq_len"] == 2 * T
    assert no_remat.components["activations_dpo"] == 2 * T * m.n_layers * (2 * lin + 32 * 2 * T * 6)
    rows = make_plan(
        dataclasses.replace(
            cfg,
            model=dataclasses.replace(m, remat=False),
            train=dataclasses.replace(cfg.train, dpo_shared_prompt=False),
        ),
        mesh="data=1,fsdp=8,tensor=1",
        device="v5p",
    )
    assert rows.details["dpo_rows"] == 2 * rows.details["sft_rows"]
    assert rows.components["activations_dpo"] == 2 * rows.components["activations"]
    assert rows.components["logits_dpo"] == no_remat.components["logits_dpo"]
    # FLOPs: 4 N tok + 6 N_lora tok + 12 L H hd T tok (all layers adapted)
    tok = cfg.train.batch_size * T
    n_mm = m.n_layers * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336) + 128256 * 4096
    want = 4 * n_mm * tok + 6 * plan.n_lora * tok + 12 * 32 * 32 * 128 * T * tok
    assert plan.flops["sft"] == pytest.approx(want, rel=1e-9)
    assert plan.flops["sft_per_device"] == pytest.approx(want / 8)
    table = plan.table()
    for word in ("parameters", "kv_cache", "activations", "optimizer", "FLOPs", "verdict: fits"):
        assert word in table


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.1-8b", "qwen2.5-1.5b", "qwen3-0.6b"])
def test_parameter_formulas_match_the_abstract_trees(preset):
    """ModelConfig.n_params / flops.lora_params (what the plan reports) count exactly the leaves the model
    and the adapter allocate."""
    from malt_jax.config import MODEL_PRESETS, LoraConfig
    from malt_jax.model.llama import abstract_params
    from malt_jax.model.lora import abstract_adapter
    from malt_jax.planning.flops import lora_params

    m = MODEL_PRESETS[preset]()
    assert m.n_params == sum(x.size for x in jax.tree.leaves(abstract_params(m)))
    for lo in (LoraConfig(), LoraConfig(rank=4, targets=("wq", "w_down"), top_layers=2)):
        n = sum(x.size for x in jax.tree.leaves(abstract_adapter(m, lo)))
        assert lora_params(m, lo.rank, lo.targets, lo.top_layers or m.n_layers) == n


def test_8b_on_one_16gib_device_is_refused_naming_parameters():
    cfg = load_run_config(GSM8K_8B, ["mesh={}"])
    plan = make_plan(cfg, mesh="data=1,fsdp=1,tensor=1", device_memory="16GiB")
    assert not plan.fits and plan.components["parameters"] > plan.budget
    with pytest.raises(PlanError) as e:
        plan.check()
    msg = str(e.value)
    assert "plan refused" in msg and "overflowing component: parameters" in msg
    assert "raise mesh fsdp" in msg


def test_refusal_names_kv_cache_when_the_tree_is_too_big():
    cfg = load_run_config(ROOT / "experiments" / "llama32_1b_gsm8k.yaml", ["tree.questions_per_batch=64"])
    plan = make_plan(cfg, device="h100")
    assert ("sample", "kv_cache") in plan.overflows() and ("sft", "parameters") not in plan.overflows()
    assert "overflowing component: kv_cache" in plan.refusal() and "tree.questions_per_batch" in plan.refusal()


def test_top_layers_cut_activations_and_backward_flops():
    cfg = load_run_config(GSM8K_8B, ["model.remat=false"])
    full = make_plan(cfg, device="v5p")
    top = make_plan(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, top_layers=8)), device="v5p")
    assert top.components["activations"] == full.components["activations"] * 9 // 32  # 8 adapted + 1 transient
    assert top.n_lora * 4 == full.n_lora
    assert 0.55 < top.flops["sft"] / full.flops["sft"] < 0.7  # forward everywhere, backward on 8/32 layers


def test_aot_one_layer_compile_agrees_with_analytic_flops():
    """AOT-compiles the sharded 1-layer 8B SFT step from ShapeDtypeStructs (nothing allocated)."""
    assert jax.device_count() >= 8
    cfg = load_run_config(GSM8K_8B, ["train.max_seq_len=512", "train.grad_accum=1", "train.batch_size=8"])
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="v5p", compile=True)
    k = plan.compiled
    assert "error" not in k, k
    assert k["devices"] == 8 and k["argument_bytes"] > 0
    assert 0.9 < k["flops"] / k["analytic_flops"] < 1.3, k
    assert analytic_step_flops(cfg, 8) == plan.flops["sft"]
    assert "AOT check" in plan.table()


def _compiler_config(shape: str, *extra: str):
    """An experiment's config cut to 2 layers, float32, fsdp=8: the shape the planner-vs-compiler
    tests compile (``extra``: more overrides)."""
    return load_run_config(
        ROOT / "experiments" / f"{shape}.yaml",
        [
            "model.n_layers=2",
            "model.dtype=float32",
            "model.param_dtype=float32",
            "mesh={data: 1, fsdp: 8, tensor: 1}",
            *extra,
        ],
    )


@pytest.mark.parametrize("shape", ["llama32_1b_gsm8k", "llama31_8b_gsm8k"])
@pytest.mark.parametrize("remat", [True, False])
def test_planned_train_step_memory_is_within_25_percent_of_the_compiler(shape, remat):
    """The plan of the SFT and DPO steps against XLA's memory_analysis of the same sharded step
    (abstract shapes, 8 fake devices, the config's fsdp=8 mesh, its microbatch and sequence
    length), for the 1B and 8B shapes cut to 2 layers, with and without remat. float32: XLA:CPU
    runs bf16-result dots (the attention's) in float32 on float32 copies, which TPUs and GPUs do not."""
    assert jax.device_count() >= 8
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_step, compiled_bytes

    cfg = _compiler_config(shape, f"model.remat={str(remat).lower()}")
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200")
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
    for kind in ("sft", "dpo"):
        got = compiled_bytes(compile_step(cfg, kind, mesh))
        assert 0.75 < plan.phase_total(kind) / got < 1.25, (kind, plan.phase_total(kind) / GiB, got / GiB)


@pytest.mark.parametrize("shape", ["llama32_1b_gsm8k", "llama31_8b_gsm8k"])
def test_planned_sampling_memory_is_within_25_percent_of_the_compiler(shape):
    """The plan's sampling phase against XLA's memory_analysis of the expansion it describes
    (one batch of questions expanded 3x3x3 with compaction, fsdp=8, float32, 2 layers)."""
    assert jax.device_count() >= 8
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_expansion, compiled_bytes

    cfg = _compiler_config(shape)
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200", prompt_tokens=256, turn_tokens=32)
    got = compiled_bytes(
        compile_expansion(
            cfg, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8]), prompt_tokens=256, turn_tokens=32
        )
    )
    assert 0.75 < plan.phase_total("sample") / got < 1.25, (plan.phase_total("sample") / GiB, got / GiB)


RL_8B = ROOT / "experiments" / "llama31_8b_gsm8k_rl.yaml"
V5P_64 = ROOT / "tpu_configs" / "v5p-64.yaml"


def test_rl_plan_of_the_8b_config_on_v5p_64():
    """An rl section adds the RL phases: the rollout (the expansion's sample phase plus the RL
    states) and the policy-gradient update (one microbatch of rl.micro_batch rows of the longest
    role's length, the other roles' states held), and the RL iteration's FLOPs."""
    from malt_jax.planning.flops import pg_update_flops, scoring_flops
    from malt_jax.planning.plan import ADVICE

    cfg = load_run_config(RL_8B, overlay_overrides(V5P_64))
    plan = make_plan(cfg, devices=32, device="v5p")
    assert plan.fits, plan.refusal()
    assert set(plan.components) <= set(ADVICE)  # a refusal can name every RL component
    sample = plan.phases["sample"]
    assert plan.phases["rl_sample"] == tuple(p.replace("prefill", "prefill_rl") for p in sample) + ("rl_states",)
    c, d, f = plan.components, plan.details, plan.flops
    ad, opt = c["adapter"], c["optimizer"]
    assert c["rl_states"] == 3 * (ad + opt)  # every role trained, reference: base (no copies)
    assert c["rl_held"] == 3 * ad + 2 * (ad + opt)  # the start adapters + the other roles' states
    # the rollout re-encodes the refiner's 64 x 9 parent contexts (36 per device: data 2 x fsdp 8)
    # with its adapter, rows of the full width 1088 attending 1088 + 1088 slots, bf16 activations
    # and 16 heads per device (tensor 2) of float32 scores + bf16 probabilities, before forking
    lin = 4 * 4096 + 3 * 16 * 128 + 3 * 4 * 128 + 3 * 7168
    prefill = 36 * 1088 * (2 * lin + 16 * 6 * (1088 + 1088))
    assert c["prefill_rl"] == prefill - c["kv_cache"] - c["kv_compacted"] - c["decode_logits"] > 0
    assert plan.phase_total("rl_sample") == plan.phase_total("sample") - c["prefill"] + c["prefill_rl"] + c["rl_states"]
    # 64 questions x 3 / 9 / 27 nodes; rows of prompt 256 + 3 x 256 new + 2 x 32 turn tokens
    # (data.bucket_length: 1088); completions of <= 257 tokens scored in a width of 512
    assert d["rl_rows"] == {"G": 192, "V": 576, "R": 1728}
    assert (d["rl_seq_len"], d["rl_scored"], d["rl_micro_batch"], d["rl_rows_per_device"]) == (1088, 512, 16, 1)
    # the rollout: each level's parent contexts (64 / 192 / 576) encoded at the full width, then
    # every node's 256 new tokens
    assert f["rl_rollout_tokens"] == (64 + 192 + 576) * 1088 + (192 + 576 + 1728) * 256
    m, lo = cfg.model, cfg.lora
    T = {"G": 512, "V": 832, "R": 1088}  # buckets of 256 + 256, + 32 + 256, + 32 + 256
    want = sum(
        pg_update_flops(m, lo.rank, lo.targets, 0, rows, T[r], 512) + scoring_flops(m, 0, rows, T[r], 512)
        for r, rows in d["rl_rows"].items()
    )
    assert f["rl_update"] == pytest.approx(want, rel=1e-12)
    assert f["rl_iteration"] == f["rl_rollout"] + f["rl_update"]
    assert f["rl_iteration_per_device"] == pytest.approx(f["rl_iteration"] / 32)
    # a config without an rl section plans no RL phase
    plain = make_plan(load_run_config(GSM8K_8B, overlay_overrides(V5P_64)), devices=32, device="v5p")
    assert "rl_update" not in plain.phases and "rl_iteration" not in plain.flops


def test_cli_plan_prints_the_rl_rows(capsys):
    rc = cli.main(["plan", str(RL_8B), "--overlay", str(V5P_64)])
    out = capsys.readouterr().out
    assert rc == 0 and "= 32 devices | v5p: 95.00 GiB" in out
    header = next(line for line in out.splitlines() if line.startswith("per device"))
    assert header.split()[-2:] == ["rl_sample", "rl_update"]
    for row in ("rl_states", "gradients_rl", "activations_rl", "logits_rl", "rl_batch", "rl_held"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "RL iteration (analytic" in out and "rollout" in out and "verdict: fits" in out


@pytest.mark.parametrize("shape", ["llama32_1b_gsm8k", "llama31_8b_gsm8k"])
@pytest.mark.parametrize("remat", [True, False])
def test_planned_rl_update_memory_is_within_25_percent_of_the_compiler(shape, remat):
    """The plan's RL update against XLA's memory_analysis of the sharded policy-gradient step
    ``malt-jax rl`` compiles (``aot.compile_pg_step``: one microbatch of rl.micro_batch rows with
    the reference log-probs), 2 layers, float32, fsdp=8 on 8 fake devices. The compiled step holds
    the phase less what lives outside it: ``rl_held`` (the other roles' adapters and states) and
    ``rl_batch`` (the role's other microbatches)."""
    assert jax.device_count() >= 8
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_pg_step, compiled_bytes

    cfg = _compiler_config(
        shape, f"model.remat={str(remat).lower()}", "rl.iterations=1", "rl.reference=base", "rl.micro_batch=8"
    )
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200")
    got = compiled_bytes(compile_pg_step(cfg, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])))
    want = plan.phase_total("rl_update") - plan.components["rl_held"] - plan.components["rl_batch"]
    assert 0.75 < want / got < 1.25, (want / GiB, got / GiB)


@pytest.mark.parametrize("shape", ["llama32_1b_gsm8k", "llama31_8b_gsm8k"])
def test_planned_rl_rollout_memory_is_within_25_percent_of_the_compiler(shape):
    """The plan's RL rollout against XLA's memory_analysis of the expansion ``malt-jax rl`` runs:
    one adapter per role (mode "fork": each level's parents re-encoded with it), one batch of
    questions 3x3x3, fsdp=8, float32, 2 layers; less ``rl_states`` (the trained roles' states,
    outside the sampler)."""
    assert jax.device_count() >= 8
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_expansion, compiled_bytes

    cfg = _compiler_config(shape, "rl.iterations=1", "rl.reference=base")
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200", prompt_tokens=256, turn_tokens=32)
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
    got = compiled_bytes(compile_expansion(cfg, mesh, prompt_tokens=256, turn_tokens=32, mode="fork"))
    want = plan.phase_total("rl_sample") - plan.components["rl_states"]
    assert 0.75 < want / got < 1.25, (want / GiB, got / GiB)


@pytest.mark.parametrize("shape", ["llama32_1b_gsm8k", "llama31_8b_gsm8k"])
def test_rl_update_flops_agree_with_the_compiler(shape):
    """XLA's cost_analysis of the sharded 1-layer policy-gradient step vs the analytic count
    (``flops.pg_update_flops``, the LM head on the scored positions only), per device."""
    assert jax.device_count() >= 8
    from malt_jax.parallel.sharding import make_mesh
    from malt_jax.planning.aot import compile_pg_step
    from malt_jax.planning.flops import pg_update_flops

    cfg = load_run_config(
        ROOT / "experiments" / f"{shape}.yaml",
        ["model.n_layers=1", "lora.top_layers=0", "rl.iterations=1", "rl.reference=base", "rl.micro_batch=8"],
    )
    plan = make_plan(cfg, mesh="data=1,fsdp=8,tensor=1", device="h200")
    compiled = compile_pg_step(cfg, make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8]))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    d = plan.details
    want = pg_update_flops(cfg.model, cfg.lora.rank, cfg.lora.targets, 0, 8, d["rl_seq_len"], d["rl_scored"]) / 8
    assert 0.75 < float(cost["flops"]) / want < 1.25, (float(cost["flops"]), want)


def test_aot_check_reports_missing_devices():
    cfg = load_run_config(ROOT / "experiments" / "llama32_1b_gsm8k.yaml")
    plan = make_plan(cfg, mesh="data=1,fsdp=64,tensor=1", device="v5p", compile=True)
    assert "64 devices" in plan.compiled["error"]


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_plan_prints_the_table(capsys):
    rc = cli.main(["plan", GSM8K_8B, "--mesh", "data=1,fsdp=8,tensor=1", "--device", "v5p"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mesh data=1,fsdp=8,tensor=1 = 8 devices" in out and "v5p: 95.00 GiB" in out
    for row in ("parameters", "kv_cache", "activations_dpo", "total", "fits"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "verdict: fits" in out


def test_cli_plan_refuses(capsys):
    rc = cli.main(["plan", GSM8K_8B, "--mesh", "data=1,fsdp=1,tensor=1", "--devices", "1", "--device-memory", "16GiB"])
    cap = capsys.readouterr()
    assert rc == 3
    assert "verdict: REFUSED" in cap.out
    assert "overflowing component: parameters" in cap.err


def test_cli_plan_overlay_and_bad_mesh(capsys):
    rc = cli.main(["plan", GSM8K_8B, "--overlay", str(ROOT / "tpu_configs" / "v5e-16.yaml")])
    out = capsys.readouterr().out
    assert rc == 0 and "= 16 devices | v5e: 16.00 GiB" in out
    rc = cli.main(["plan", GSM8K_8B, "--mesh", "data=3,fsdp=8", "--devices", "8"])
    assert rc == 2 and "24 devices" in capsys.readouterr().err


def test_cli_plan_compile_fakes_the_mesh_devices():
    """``malt-jax plan --compile`` in a fresh process without a device count in XLA_FLAGS: the
    command sets one before jax starts its backend, so the AOT check sees the mesh's 2 devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "malt_jax",
            "plan",
            "experiments/smollm2_synthetic.yaml",
            "train.max_seq_len=128",
            "--mesh",
            "data=1,fsdp=2,tensor=1",
            "--compile",
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode in (0, 3), out.stderr
    compiled = json.loads(out.stdout)["compiled"]
    assert "error" not in compiled, compiled
    assert compiled["devices"] == 2 and compiled["platform"] == "cpu"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_launch_sh_runs_the_same_command_on_every_worker():
    env = {**os.environ, "DRY_RUN": "1", "TPU": "malt-v5p", "ZONE": "us-east5-a", "LOCAL_PYTHON": sys.executable}
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "tpu_configs" / "launch.sh"),
            "run",
            "v5p-64",
            "experiments/llama31_8b_gsm8k.yaml",
            "task.path=/data/gsm8k",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout)
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in words
    remote = shlex.split(next(w for w in words if w.startswith("--command=")).split("=", 1)[1])
    assert "MALT_DISTRIBUTED=1" in remote and ".venv/bin/malt-jax" in remote
    i = remote.index(".venv/bin/malt-jax")
    args = remote[i + 1 : remote.index("--no-progress")]
    assert args[:2] == ["run", "experiments/llama31_8b_gsm8k.yaml"] and args[-1] == "task.path=/data/gsm8k"
    cfg = load_run_config(ROOT / args[1], args[2:])  # what every worker will run
    assert dict(cfg.mesh) == {"data": 2, "fsdp": 8, "tensor": 2} and cfg.tree.questions_per_batch == 64


def test_refusal_names_dpo_activations_and_every_component_has_advice():
    from malt_jax.planning.plan import ADVICE

    cfg = load_run_config(ROOT / "experiments" / "llama32_1b_gsm8k.yaml")
    plan = make_plan(cfg, device="v5e")  # 16 GiB: the 1B weights fit, a 1280-token DPO microbatch does not
    assert set(plan.components) <= set(ADVICE)
    assert ("dpo", "activations_dpo") in plan.overflows()
    assert "overflowing component: activations_dpo" in plan.refusal() and "train.grad_accum" in plan.refusal()
