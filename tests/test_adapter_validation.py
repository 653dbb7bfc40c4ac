"""``rundir.load_adapter`` checks an adapter file's keys, shapes and dtypes (against the run's
``model.lora.abstract_adapter`` where the run is known) and names the file, so a bad adapter is
refused in one line before ``ask``, ``export`` or a resumed train stage use it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from malt_jax.config import LoraConfig, ModelConfig, RunConfig, to_dict
from malt_jax.model.lora import init_lora
from malt_jax.model.weights import WeightError
from malt_jax.stages.rundir import load_adapter, save_adapter

MODEL = ModelConfig.tiny(n_layers=3)
LORA = LoraConfig(rank=2, alpha=4.0, targets=("wq", "w_down"), top_layers=2)
CFG = RunConfig(model_preset="tiny", model=MODEL, lora=LORA)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("ad")
    ad = jax.tree.map(lambda x: x + 0.1, init_lora(MODEL, LORA, jax.random.key(0)))
    save_adapter(ad, d / "good.safetensors")
    return ad, load_file(str(d / "good.safetensors"))


def _save(path, tensors):
    save_file(tensors, str(path))
    return path


def test_a_good_adapter_loads_unchanged(tmp_path, good):
    ad, tensors = good
    back = load_adapter(_save(tmp_path / "a.safetensors", tensors), CFG)
    for name in LORA.targets:
        for f in ("a", "b"):
            np.testing.assert_array_equal(np.asarray(back["layers"][name][f]), np.asarray(ad["layers"][name][f]))
    assert load_adapter(tmp_path / "a.safetensors")["layers"].keys() == back["layers"].keys()  # no run: shapes only


def _variants(t):
    f32 = np.float32
    return [
        ("foreign key", {**t, "layers.wq.c": t["layers.wq.a"]}, "tensor 'layers.wq.c' is not an adapter weight"),
        ("unknown weight", {**t, "layers.wx.a": t["layers.wq.a"]}, "tensor 'layers.wx.a' is not an adapter weight"),
        ("flat key", {"wq": t["layers.wq.a"]}, "tensor 'wq' is not an adapter weight"),
        ("missing b", {k: v for k, v in t.items() if k != "layers.wq.b"}, "tensor 'layers.wq.b' is missing"),
        ("float64", {**t, "layers.wq.a": t["layers.wq.a"].astype(np.float64)}, "dtype float64, expected float32"),
        ("int", {**t, "layers.wq.b": t["layers.wq.b"].astype(np.int32)}, "'layers.wq.b' has dtype int32"),
        ("2-d", {**t, "layers.wq.a": t["layers.wq.a"][0]}, "'layers.wq.a' has shape [64, 2], expected 3 dims"),
        ("nan", {**t, "layers.wq.b": np.full_like(t["layers.wq.b"], np.nan)}, "'layers.wq.b' has non-finite values"),
        (
            "a/b rank mismatch",
            {**t, "layers.wq.b": np.zeros((2, 3, 64), f32)},
            "layers.wq: a [2, 64, 2] and b [2, 3, 64] do not chain",
        ),
        ("empty", {}, "no adapter tensors"),
    ]


CASES = [c[0] for c in _variants({k: np.zeros((2, 64, 2), np.float32) for k in ("layers.wq.a", "layers.wq.b")})]


@pytest.mark.parametrize("case", CASES)
def test_malformed_adapters_are_refused_naming_file_and_tensor(tmp_path, good, case):
    _, tensors = good
    _, bad, needle = next(v for v in _variants(tensors) if v[0] == case)
    path = tmp_path / "bad.safetensors"
    if bad:
        _save(path, bad)
    else:
        path.write_bytes(b"")  # safetensors cannot write an empty file this way; an empty file instead
        needle = "not a readable safetensors adapter"
    for cfg in (CFG, None):
        with pytest.raises(WeightError) as info:
            load_adapter(path, cfg)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


@pytest.mark.parametrize(
    "lora,needle",
    [
        (
            dataclasses.replace(LORA, rank=3),
            "'layers.w_down.a' has shape [2, 128, 2], the run's model and lora config need [2, 128, 3]",
        ),
        (dataclasses.replace(LORA, top_layers=0), "need [3, 128, 2]"),
        (dataclasses.replace(LORA, targets=("wq",)), "'layers.w_down.a' is not in the run's lora.targets"),
        (dataclasses.replace(LORA, targets=("wq", "wv", "w_down")), "'layers.wv.a' is missing"),
    ],
)
def test_an_adapter_of_another_config_is_refused(tmp_path, good, lora, needle):
    _, tensors = good
    path = _save(tmp_path / "a.safetensors", tensors)
    with pytest.raises(WeightError) as info:
        load_adapter(path, dataclasses.replace(CFG, lora=lora))
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)


def test_the_run_directory_config_is_used_by_default(tmp_path, good):
    """Callers that pass no config (load_adapters for ask/export, the train stage's resume) get the
    full check from the run directory's config.yaml."""
    _, tensors = good
    (tmp_path / "adapters").mkdir()
    path = _save(tmp_path / "adapters" / "G.safetensors", tensors)
    other = dataclasses.replace(CFG, lora=dataclasses.replace(LORA, rank=4))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"config_hash": other.hash(), **to_dict(other)}))
    with pytest.raises(WeightError, match="the run's model and lora config need"):
        load_adapter(path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"config_hash": CFG.hash(), **to_dict(CFG)}))
    assert set(load_adapter(path)["layers"]) == {"wq", "w_down"}


def test_missing_and_truncated_files_are_named(tmp_path, good):
    with pytest.raises(WeightError, match=f"^{tmp_path / 'none.safetensors'}: missing$"):
        load_adapter(tmp_path / "none.safetensors", CFG)
    _, tensors = good
    data = _save(tmp_path / "t.safetensors", tensors).read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=f"^{tmp_path / 't.safetensors'}: not a readable safetensors adapter"):
        load_adapter(tmp_path / "t.safetensors", CFG)
