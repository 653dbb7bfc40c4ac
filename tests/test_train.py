"""Batching (data.py) and the LoRA SFT/DPO steps and driver (train.py) on a tiny model."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from tests.fixtures import numpy_random_params

from malt_jax import data as D
from malt_jax.config import LoraConfig, ModelConfig, TrainConfig
from malt_jax.model.lora import init_lora, lora_scale
from malt_jax.sharding import make_mesh
from jax.sharding import PartitionSpec as P
from malt_jax.train import (NonFiniteError, Stepper, TrainState, make_optimizer, reference_logps,
                            train_role)

CFG = ModelConfig.tiny(n_layers=1)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))  # few leaves: faster compiles
TRAIN = TrainConfig(learning_rate=1e-2, dpo_learning_rate=1e-2, warmup_steps=2, batch_size=8, grad_accum=1,
                    max_seq_len=32, grad_clip=1.0, sft_epochs=1, dpo_epochs=1, checkpoint_every=2)


def _sft_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [D.SFTExample(list(rng.integers(1, 256, rng.integers(2, 8))), list(rng.integers(1, 256, rng.integers(2, 9))))
            for _ in range(n)]


def _dpo_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [D.DPOExample(list(rng.integers(1, 256, rng.integers(2, 8))), list(rng.integers(1, 256, rng.integers(2, 9))),
                         list(rng.integers(1, 256, rng.integers(2, 9)))) for _ in range(n)]


@pytest.fixture(scope="module")
def base():
    return numpy_random_params(CFG)


def _state(train_cfg, total, lr, key=1):
    opt = make_optimizer(train_cfg, total, lr)
    return TrainState.create(init_lora(CFG, LORA, jax.random.key(key)), opt), opt


def _close(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# data


def test_truncate_keeps_completion():
    assert D.truncate([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])
    assert D.truncate([1, 2, 3, 4, 5], [6, 7], 4) == ([4, 5], [6, 7])  # prompt cut from the left
    assert D.truncate([1, 2, 3], [4, 5, 6, 7, 8], 4) == ([3], [4, 5, 6])  # completion end cut, 1 prompt kept
    assert D.truncate([], [4, 5, 6, 7, 8], 4) == ([], [4, 5, 6, 7])
    assert D.bucket_length(3, 512) == 16 and D.bucket_length(17, 512) == 32 and D.bucket_length(300, 256) == 256
    assert D.bucket_length(129, 512) == 192 and D.bucket_length(321, 512) == 384


def test_pack_sft_alignment_and_padding_rows():
    b = D.pack_sft([D.SFTExample([1, 2, 3], [4, 5], weight=2.0), None], max_len=64)
    assert b["tokens"].shape == (2, 16) and b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"][0, :4], [1, 2, 3, 4])
    np.testing.assert_array_equal(b["targets"][0, :4], [2, 3, 4, 5])
    np.testing.assert_array_equal(b["loss_mask"][0, :5], [0, 0, 2, 2, 0])  # targets 4, 5 only
    assert b["loss_mask"][1].sum() == 0 and list(b["weights"]) == [2.0, 0.0]
    long = D.pack_sft([D.SFTExample(list(range(1, 40)), [90, 91, 92])], max_len=16)
    assert long["tokens"].shape == (1, 16)
    np.testing.assert_array_equal(long["targets"][0, 12:15], [90, 91, 92])  # completion survives
    assert long["tokens"][0, 0] == 40 - 13  # 13 prompt tokens kept (from the right)
    assert long["loss_mask"].sum() == 3


def test_pack_dpo_interleaves_pairs():
    b = D.pack_dpo([D.DPOExample([1, 2], [3, 4, 5], [6]), None], max_len=64)
    assert b["tokens"].shape == (4, 16) and b["weights"].tolist() == [1.0, 0.0]
    np.testing.assert_array_equal(b["targets"][0, :4], [2, 3, 4, 5])  # chosen
    np.testing.assert_array_equal(b["targets"][1, :2], [2, 6])  # rejected
    assert b["loss_mask"][0].sum() == 3 and b["loss_mask"][1].sum() == 1 and b["loss_mask"][2:].sum() == 0


def test_epoch_batches_deterministic_resumable_padded():
    full = list(D.epoch_batches(10, 4, seed=3, epoch=1))
    assert [b for b, _ in full] == [0, 1, 2]
    flat = np.concatenate([i for _, i in full])
    assert sorted(flat[flat >= 0].tolist()) == list(range(10)) and (flat[10:] == -1).all()
    again = list(D.epoch_batches(10, 4, seed=3, epoch=1, start=1))
    assert [b for b, _ in again] == [1, 2] and all((x == y).all() for (_, x), (_, y) in zip(again, full[1:]))
    other = np.concatenate([i for _, i in D.epoch_batches(10, 4, seed=3, epoch=2)])
    assert not (other == flat).all()


# ----------------------------------------------------------------------------------------------
# steps


def test_sft_loss_decreases_memorisation(base):
    exs = _sft_examples(8)
    state, opt = _state(TRAIN, 20, 3e-2)
    step = Stepper("sft", CFG, LORA, TRAIN, opt, role="generator")
    batch = D.pack_sft(exs, TRAIN.max_seq_len)
    losses = []
    for _ in range(20):
        state, m = step(base, state, batch)
        losses.append(m["loss"])
    assert losses[0] > 4.0 and losses[-1] < 0.25 * losses[0], losses  # 7.6 -> ~1.0
    assert int(state.step) == 20 and m["grad_norm"] > 0 and m["learning_rate"] > 0


def test_dpo_step_increases_margin(base):
    exs = _dpo_examples(8)
    state, opt = _state(TRAIN, 10, TRAIN.dpo_learning_rate)
    ref = reference_logps(base, state.adapter, exs, CFG, TRAIN, lora_scale(LORA))
    batch = D.pack_dpo(exs, TRAIN.max_seq_len)
    step = Stepper("dpo", CFG, LORA, TRAIN, opt, role="verifier")
    margins, losses = [], []
    for _ in range(4):
        state, m = step(base, state, batch, ref.reshape(-1))
        margins.append(m["rewards/margins"])
        losses.append(m["loss"])
    assert abs(margins[0]) < 1e-3 and math.isclose(losses[0], math.log(2), rel_tol=1e-3)  # policy == ref
    assert margins[-1] > margins[1] > 0 and losses[-1] < losses[0]


def _kind_batch(kind, seed):
    """7 examples + 1 weight-0 padding row; DPO gets reference log-probs != the policy's."""
    if kind == "sft":
        return D.pack_sft(_sft_examples(7, seed) + [None], TRAIN.max_seq_len), ()
    ref = np.random.default_rng(seed).normal(-40, 3, size=(16,)).astype(np.float32)
    return D.pack_dpo(_dpo_examples(7, seed) + [None], TRAIN.max_seq_len), (ref,)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_grad_accumulation_equals_union_batch(base, kind):
    batch, extra = _kind_batch(kind, seed=1)
    out = {}
    for accum in (1, 2):
        cfg = dataclasses.replace(TRAIN, grad_accum=accum)
        state, opt = _state(cfg, 10, cfg.learning_rate)
        out[accum] = Stepper(kind, CFG, LORA, cfg, opt)(base, state, batch, *extra)
    (s1, m1), (s2, m2) = out[1], out[2]
    _close(s1.adapter, s2.adapter, rtol=1e-5, atol=1e-6)
    for k, v in m1.items():
        assert math.isclose(v, m2[k], rel_tol=1e-5, abs_tol=1e-6), (k, v, m2[k])


@pytest.mark.parametrize("kind,shape", [("sft", {"data": 2, "fsdp": 2, "tensor": 2}), ("dpo", {"data": 8})])
def test_sharded_step_matches_single_device(base, kind, shape):
    mesh = make_mesh(shape)
    cfg = dataclasses.replace(TRAIN, grad_accum=2)
    batch, extra = _kind_batch(kind, seed=2)
    state0, opt = _state(cfg, 10, cfg.learning_rate)
    s_ref, m_ref = Stepper(kind, CFG, LORA, cfg, opt)(base, state0, batch, *extra)
    sharded = Stepper(kind, CFG, LORA, cfg, opt, mesh=mesh)
    b_sh, st_sh = sharded.place(base, state0)
    if "tensor" in shape:
        assert b_sh["layers"]["wq"].sharding.spec == P(None, "fsdp", "tensor")
        assert st_sh.adapter["layers"]["wq"]["a"].sharding.spec == P(None, "fsdp", None)
        assert st_sh.opt_state[1].mu["layers"]["wq"]["b"].sharding.spec == P(None, None, "tensor")
    s_sh, m_sh = sharded(b_sh, st_sh, batch, *extra)
    assert s_sh.adapter["layers"]["wq"]["b"].sharding.mesh.shape == mesh.shape
    _close(s_ref.adapter, s_sh.adapter, rtol=1e-5, atol=1e-6)
    for k, v in m_ref.items():
        assert math.isclose(v, m_sh[k], rel_tol=1e-5, abs_tol=1e-6), (k, v, m_sh[k])


def test_non_finite_raises_without_update(base):
    exs = _sft_examples(8, seed=3)
    batch = D.pack_sft(exs, TRAIN.max_seq_len)
    batch["loss_mask"][0, 2] = np.nan  # a poisoned batch
    state, opt = _state(TRAIN, 10, TRAIN.learning_rate)
    step = Stepper("sft", CFG, LORA, TRAIN, opt, role="refiner")
    with pytest.raises(NonFiniteError, match=r"role 'refiner'.*step 0.*NOT applied") as info:
        step(base, state, batch)
    kept = info.value.state
    assert int(kept.step) == 0
    _close(kept.adapter, state.adapter, rtol=0, atol=0)
    _close(kept.opt_state, state.opt_state, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# driver


def test_train_role_requires_data(tmp_path):
    with pytest.raises(ValueError, match="no positive trajectories.*easier.*more training questions.*samples"):
        train_role({}, CFG, LORA, TRAIN, [], [], "verifier", tmp_path / "ck", progress=False)


def test_train_role_sft_then_dpo(base, tmp_path, caplog):
    cfg = dataclasses.replace(TRAIN, dpo_reference="base")
    adapter, hist = train_role(base, CFG, LORA, cfg, _sft_examples(12), _dpo_examples(5), "refiner",
                               tmp_path / "ck", progress=False)
    stages = [h["stage"] for h in hist]
    assert stages == ["sft"] * 2 + ["dpo"]  # ceil(12/8) SFT steps, ceil(5/8) DPO step
    assert all(h["tokens_per_s"] > 0 for h in hist)
    assert abs(hist[2]["rewards/margins"]) > 0  # reference = base, policy = SFT adapter
    # re-running on a finished directory resumes at the end: no more steps
    again, hist2 = train_role(base, CFG, LORA, cfg, _sft_examples(12), _dpo_examples(5), "refiner",
                              tmp_path / "ck", progress=False)
    assert len(hist2) == 3
    _close(adapter, again, rtol=0, atol=0)
    with caplog.at_level("WARNING"):
        _, h3 = train_role(base, CFG, LORA, cfg, _sft_examples(3), None, "generator", tmp_path / "ck2",
                           progress=False)
    assert [h["stage"] for h in h3] == ["sft"] and "skipping dpo stage" in caplog.text
