"""Export of role adapters to PEFT LoRA folders and merged Hugging Face checkpoints, and back.

The layout is checked against an independent reference: PEFT's definition of a LoRA layer
(``W + lora_alpha / r * B @ A`` on Hugging Face ``[out, in]`` weights) applied in NumPy float64 to
the exported tensors, run through the NumPy Llama of tests/reference.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from malt_jax.config import LoraConfig, ModelConfig, load_run_config
from malt_jax.model.llama import causal_positions, forward
from malt_jax.model.lora import init_lora, lora_scale
from malt_jax.model.weights import WeightError, load_hf, save_hf
from malt_jax.workflows import pipeline
from malt_jax.workflows.export import export_run, load_peft, save_peft
from tests.fixtures import numpy_random_params
from tests.reference import reference_logits

CFG = ModelConfig.tiny(n_layers=3)
TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _adapter(lora_cfg, seed=1):
    """A random adapter with non-zero B (a fresh one is the identity and would hide layout bugs)."""
    ad = init_lora(CFG, lora_cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32), ad)


def _ours(params, adapter, lora_cfg, tokens):
    t = jnp.asarray(tokens)[None]
    logits, _ = forward(params, t, causal_positions(1, t.shape[1]), CFG, lora=adapter, lora_scale=lora_scale(lora_cfg))
    return np.asarray(logits[0], np.float64)


@pytest.mark.parametrize("top", [0, 2])
def test_peft_layout_matches_an_independent_reference(tmp_path, top):
    lora_cfg = LoraConfig(rank=4, alpha=12.0, targets=TARGETS, top_layers=top)
    params, adapter = numpy_random_params(CFG), _adapter(lora_cfg)
    out = save_peft(adapter, CFG, lora_cfg, tmp_path / "peft", "/models/base")
    conf = json.loads((out / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"], conf["bias"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        12.0,
        "none",
    )
    assert conf["base_model_name_or_path"] == "/models/base"
    assert sorted(conf["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert conf["layers_to_transform"] == ([1, 2] if top == 2 else None)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    first = 1 if top == 2 else 0
    a = tensors[f"base_model.model.model.layers.{first}.self_attn.q_proj.lora_A.weight"]
    b = tensors[f"base_model.model.model.layers.{first}.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, CFG.dim) and b.shape == (CFG.dim, 4)  # A (r, in), B (out, r)
    assert len(tensors) == 2 * len(TARGETS) * (top or CFG.n_layers)
    # PEFT's forward in float64 on the exported tensors == ours with the adapter
    save_hf(params, CFG, tmp_path / "base")
    hf = {k: v.astype(np.float64) for k, v in load_file(str(tmp_path / "base" / "model.safetensors")).items()}
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace("lora_A", "lora_B")].astype(np.float64)
        hf[f"{module}.weight"] = hf[f"{module}.weight"] + conf["lora_alpha"] / conf["r"] * B @ tensors[key]
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"] if CFG.tie_embeddings else hf["lm_head.weight"]
    tokens = np.array([3, 17, 99, 5, 42, 7])
    ref = reference_logits(hf, CFG, tokens)
    np.testing.assert_allclose(_ours(params, adapter, lora_cfg, tokens), ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("top", [0, 2])
def test_peft_round_trip(tmp_path, top):
    lora_cfg = LoraConfig(rank=3, alpha=6.0, targets=("wq", "wv", "w_down"), top_layers=top)
    adapter = _adapter(lora_cfg, seed=2)
    save_peft(adapter, CFG, lora_cfg, tmp_path)
    back, back_cfg = load_peft(tmp_path, CFG)
    assert (back_cfg.rank, back_cfg.alpha, set(back_cfg.targets), back_cfg.top_layers) == (
        3,
        6.0,
        set(lora_cfg.targets),
        top,
    )
    for name in lora_cfg.targets:
        for f in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(back["layers"][name][f]), np.asarray(adapter["layers"][name][f]))


def _write(tmp_path, conf, tensors):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))


def test_load_peft_refuses_what_it_cannot_represent(tmp_path):
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets=("wq",), top_layers=0)
    save_peft(_adapter(lora_cfg), CFG, lora_cfg, tmp_path / "ok")
    conf = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    with pytest.raises(WeightError, match="adapter_config.json: missing"):
        load_peft(tmp_path / "nothing", CFG)
    for field, value, match in (
        ("peft_type", "IA3", "peft_type = 'IA3'"),
        ("bias", "all", "bias = 'all'"),
        ("use_dora", True, "use_dora"),
        ("rank_pattern", {"q_proj": 4}, "rank_pattern"),
        ("r", 0, "r = 0"),
    ):
        _write(tmp_path / field, {**conf, field: value}, tensors)
        with pytest.raises(WeightError, match=match):
            load_peft(tmp_path / field, CFG)
    # the middle layer only: not a top block
    mid = {k: v for k, v in tensors.items() if ".layers.1." in k}
    _write(tmp_path / "mid", conf, mid)
    with pytest.raises(WeightError, match="not the model's top layers"):
        load_peft(tmp_path / "mid", CFG)
    # an unknown module, and a missing B
    bad = {**tensors, "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": np.zeros((2, 64), np.float32)}
    _write(tmp_path / "mod", conf, bad)
    with pytest.raises(WeightError, match="no malt-jax LoRA target"):
        load_peft(tmp_path / "mod", CFG)
    _write(tmp_path / "noB", conf, {k: v for k, v in tensors.items() if not (".layers.2." in k and "lora_B" in k)})
    with pytest.raises(WeightError, match="layer 2 self_attn.q_proj: lora_A and lora_B are both needed"):
        load_peft(tmp_path / "noB", CFG)
    with pytest.raises(WeightError, match="do not fit this model"):
        load_peft(tmp_path / "ok", ModelConfig.tiny(n_layers=3, dim=32, head_dim=8))
    # rsLoRA: scale alpha / sqrt(r) becomes our alpha' / r
    _write(tmp_path / "rs", {**conf, "use_rslora": True}, tensors)
    assert load_peft(tmp_path / "rs", CFG)[1].alpha == pytest.approx(4.0 * 2**0.5)


CONFIG = """
name: export
model_preset: tiny
weights: random
run_dir: {run_dir}
lora: {{rank: 2, alpha: 4.0, targets: [wq, wv, w_down], top_layers: 1}}
"""


def test_export_run_merged_and_peft(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "run"))
    cfg = load_run_config(path)
    run_dir = pipeline.prepare_run_dir(cfg)
    with pytest.raises(FileNotFoundError, match="no trained role adapters"):
        export_run(run_dir, tmp_path / "out")
    model = pipeline.load_model(cfg.weights, cfg.model)
    (run_dir / "adapters").mkdir()
    adapters = {}
    for i, role in enumerate(pipeline.ROLES):
        ad = init_lora(model.cfg, cfg.lora, jax.random.key(i))
        ad = jax.tree.map(lambda x, i=i: x + 0.1 * (i + 1), ad)
        pipeline.save_adapter(ad, run_dir / "adapters" / f"{role}.safetensors")
        pipeline.save_adapter(ad, run_dir / "adapters" / f"{role}_sft.safetensors")
        adapters[role] = ad
    written = export_run(run_dir, tmp_path / "out", "both")
    assert set(written) == {"base", "G", "V", "R", "G-merged", "V-merged", "R-merged"}
    tokens = jnp.asarray([[5, 9, 300, 2, 11]])
    pos = causal_positions(1, 5)
    for role, ad in adapters.items():
        want, _ = forward(model.params, tokens, pos, model.cfg, lora=ad, lora_scale=lora_scale(cfg.lora))
        merged, mcfg = load_hf(written[f"{role}-merged"])
        got, _ = forward(merged, tokens, pos, mcfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        back, back_cfg = load_peft(written[role], model.cfg)
        assert back_cfg.top_layers == 1 and back_cfg.rank == 2
        again, _ = forward(model.params, tokens, pos, model.cfg, lora=back, lora_scale=lora_scale(back_cfg))
        np.testing.assert_allclose(np.asarray(again), np.asarray(want), rtol=1e-6, atol=1e-6)
        assert json.loads((written[role] / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
            written["base"].resolve()
        )
    # the exported tokenizer is the run's, chat template included
    tcfg = json.loads((written["base"] / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == model.tokenizer.chat_template and (written["base"] / "tokenizer.json").exists()
    from malt_jax.model.tokenizer import Tokenizer

    tok = Tokenizer.from_tokenizer_json(written["base"] / "tokenizer.json")
    assert tok.encode("What is 2 + 3?") == model.tokenizer.encode("What is 2 + 3?")
