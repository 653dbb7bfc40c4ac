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


def test_export_run_merged_and_peft(tmp_path, fast_model):
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


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("layer_replication", [[0, 2], [1, 3]], "layer replication"),
        ("exclude_modules", ["k_proj"], "excluded modules"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("lora_bias", True, "LoRA biases"),
        ("trainable_token_indices", [5, 6], "trainable token"),
        ("use_dora", "false", "expected true or false"),  # a string, not JSON false
        ("use_rslora", "true", "expected true or false"),
        ("fan_in_fan_out", 1, "expected true or false"),
        ("lora_alpha", float("nan"), "finite number > 0"),
        ("lora_alpha", 0, "finite number > 0"),
        ("lora_alpha", True, "finite number > 0"),
        ("r", True, "int >= 1"),
        ("layers_to_transform", [0], "disagrees with the tensors"),
        ("layers_to_transform", [0, 1, 2, 3], "disagrees with the tensors"),
        ("layers_to_transform", "top", "expected null, an int or a list of ints"),
        ("target_modules", ["q_proj", "v_proj"], "disagrees with the tensors"),
        ("target_modules", [], "disagrees with the tensors"),
    ],
)
def test_load_peft_refuses_unrepresentable_fields_naming_file_and_field(tmp_path, field, value, match):
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets=("wq",), top_layers=0)
    save_peft(_adapter(lora_cfg), CFG, lora_cfg, tmp_path / "ok")
    conf = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    _write(tmp_path / "bad", {**conf, field: value}, load_file(str(tmp_path / "ok" / "adapter_model.safetensors")))
    with pytest.raises(WeightError, match=match) as info:
        load_peft(tmp_path / "bad", CFG)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'bad' / 'adapter_config.json'}: {field} = ") and "\n" not in msg


def test_load_peft_accepts_consistent_optional_fields(tmp_path):
    lora_cfg = LoraConfig(rank=2, alpha=4.0, targets=("wq", "w_down"), top_layers=1)
    save_peft(_adapter(lora_cfg), CFG, lora_cfg, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [2]
    for extra in (
        {"layers_to_transform": 2, "use_dora": False, "lora_bias": False, "modules_to_save": None},
        {"target_modules": "all-linear", "exclude_modules": None, "layer_replication": None, "use_rslora": None},
        {"target_modules": ["down_proj", "q_proj"], "trainable_token_indices": None},
    ):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**conf, **extra}))
        back, back_cfg = load_peft(tmp_path, CFG)
        assert back_cfg == lora_cfg


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "cfg.yaml"
    path.write_text(CONFIG.format(run_dir=path.parent / "run"))
    cfg = load_run_config(path)
    return pipeline.load_model(cfg.weights, cfg.model)


@pytest.fixture
def fast_model(tiny_model, monkeypatch):
    """export_run's model load (the tokenizer read from the embedded GGUF is slow) done once."""
    monkeypatch.setattr(pipeline, "load_model", lambda weights, cfg: tiny_model)


def _export_fixture(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "run"))
    cfg = load_run_config(path)
    run_dir = pipeline.prepare_run_dir(cfg)
    (run_dir / "adapters").mkdir()
    for i, role in enumerate(pipeline.ROLES):
        ad = jax.tree.map(lambda x, i=i: x + 0.1 * (i + 1), init_lora(cfg.model, cfg.lora, jax.random.key(i)))
        pipeline.save_adapter(ad, run_dir / "adapters" / f"{role}.safetensors")
    return cfg, run_dir


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_is_atomic(tmp_path, monkeypatch, fast_model):
    import malt_jax.model.lora as lora_mod

    cfg, run_dir = _export_fixture(tmp_path)
    out = tmp_path / "exported" / "out"
    real_merge, calls = lora_mod.merge, []

    def failing_merge(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real_merge(*a, **k)

    # --format both fails after G's PEFT folder and merged checkpoint: no OUT, no temporary folder
    monkeypatch.setattr(lora_mod, "merge", failing_merge)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, out, "both")
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.setattr(lora_mod, "merge", real_merge)
    written = export_run(run_dir, out, "peft")
    assert set(written) == {"base", "G", "V", "R"} and all(p.parent == out for p in written.values())
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    # a failing export into an existing OUT leaves it byte for byte as it was
    calls.clear()
    monkeypatch.setattr(lora_mod, "merge", failing_merge)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(run_dir, out, "merged")
    assert _tree(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    # a finished one replaces the folders it writes and keeps the others
    monkeypatch.setattr(lora_mod, "merge", real_merge)
    written = export_run(run_dir, out, "merged")
    assert {p.name for p in out.iterdir()} == {"base", "G", "V", "R", "G-merged", "V-merged", "R-merged", "notes.txt"}
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    conf = json.loads((out / "G" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((out / "base").resolve())


def test_export_refuses_a_bad_adapter_before_writing(tmp_path, fast_model):
    cfg, run_dir = _export_fixture(tmp_path)
    # an adapter of another rank: named, with the tensor, before anything is written
    bad = init_lora(cfg.model, LoraConfig(rank=3, targets=cfg.lora.targets, top_layers=1), jax.random.key(0))
    pipeline.save_adapter(bad, run_dir / "adapters" / "V.safetensors")
    with pytest.raises(ValueError) as info:
        export_run(run_dir, tmp_path / "out", "both")
    msg = str(info.value)
    assert msg.startswith(f"{run_dir / 'adapters' / 'V.safetensors'}: ") and "\n" not in msg
    assert "tensor 'layers.w_down.a' has shape [1, 128, 3], the run's model and lora config need [1, 128, 2]" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(ValueError, match="--stage must be final or sft"):
        export_run(run_dir, tmp_path / "out", "peft", stage="dpo")
