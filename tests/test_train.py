"""Batching (data.py) and the LoRA SFT/DPO steps and driver (train.py) on a tiny model."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from malt_jax.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from malt_jax.model.llama import causal_positions, forward
from malt_jax.model.lora import init_lora, lora_scale
from malt_jax.parallel.sharding import make_mesh
from malt_jax.training import data as D
from malt_jax.training.losses import sequence_logps, sft_loss
from malt_jax.training.role import (
    NonFiniteError,
    RoleTraining,
    ScheduleState,
    Stepper,
    TrainState,
    heldout_metrics,
    make_optimizer,
    optax_schedule,
    reference_logps,
    train_role,
    warmup_steps,
)
from tests.fixtures import numpy_random_params

CFG = ModelConfig.tiny(n_layers=1)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))  # few leaves: faster compiles
TRAIN = TrainConfig(
    learning_rate=1e-2,
    dpo_learning_rate=1e-2,
    warmup_ratio=0.1,
    batch_size=8,
    grad_accum=1,
    max_seq_len=32,
    grad_clip=1.0,
    sft_epochs=1,
    dpo_epochs=1,
    checkpoint_every=2,
)


def _sft_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        D.SFTExample(list(rng.integers(1, 256, rng.integers(2, 8))), list(rng.integers(1, 256, rng.integers(2, 9))))
        for _ in range(n)
    ]


def _dpo_examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        D.DPOExample(
            list(rng.integers(1, 256, rng.integers(2, 8))),
            list(rng.integers(1, 256, rng.integers(2, 9))),
            list(rng.integers(1, 256, rng.integers(2, 9))),
        )
        for _ in range(n)
    ]


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


def test_pack_dpo_shared_puts_the_prompt_once():
    pairs = [D.DPOExample([1, 2, 3], [4, 5], [6, 7, 8]), D.DPOExample([], [9, 10, 11], [12, 13]), None]
    b = D.pack_dpo_shared(pairs, 64)
    assert b["tokens"].shape == (3, 16) and b["score_index"].shape == (3, 2, 8)
    assert b["weights"].tolist() == [1.0, 1.0, 0.0]
    # prompt, chosen[:-1], rejected[:-1]; the rejected completion's positions restart after the prompt
    np.testing.assert_array_equal(b["tokens"][0, :6], [1, 2, 3, 4, 6, 7])
    np.testing.assert_array_equal(b["positions"][0, :6], [0, 1, 2, 3, 3, 4])
    np.testing.assert_array_equal(b["segments"][0, :7], [0, 0, 0, 1, 2, 2, D.SEG_PAD])
    # the last prompt position predicts both first tokens
    np.testing.assert_array_equal(b["score_index"][0, 0, :2], [2, 3])
    np.testing.assert_array_equal(b["score_targets"][0, 0, :2], [4, 5])
    np.testing.assert_array_equal(b["score_index"][0, 1, :3], [2, 4, 5])
    np.testing.assert_array_equal(b["score_targets"][0, 1, :3], [6, 7, 8])
    assert b["score_mask"][0].sum(axis=1).tolist() == [2.0, 3.0]
    # no prompt: the first completion token is not predicted (as in pack_dpo's rows)
    np.testing.assert_array_equal(b["tokens"][1, :3], [9, 10, 12])
    np.testing.assert_array_equal(b["score_targets"][1, 0, :2], [10, 11])
    np.testing.assert_array_equal(b["score_index"][1, 1, :1], [2])
    assert b["score_mask"][1].sum(axis=1).tolist() == [2.0, 1.0] and b["score_mask"][2].sum() == 0
    # as many scored tokens as pack_dpo's rows, for fewer tokens
    ex = _dpo_examples(16, seed=3)
    inter, shared = D.pack_dpo(ex, TRAIN.max_seq_len), D.pack_dpo_shared(ex, TRAIN.max_seq_len)
    assert shared["score_mask"].sum(axis=2).ravel().tolist() == inter["loss_mask"].sum(axis=1).tolist()
    assert (shared["segments"] != D.SEG_PAD).sum() < (inter["loss_mask"].sum() + (inter["tokens"] > 0).sum())
    with pytest.raises(ValueError, match="needs 6 tokens, more than length=4"):
        D.pack_dpo_shared([D.DPOExample([1, 2, 3], [4, 5], [6, 7, 8])], 64, length=4)


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


def test_role_without_data_keeps_base_model(base, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        res = train_role(base, CFG, LORA, TRAIN, [], [], "verifier", tmp_path / "ck", progress=False)
    assert isinstance(res, RoleTraining) and not res.trained
    assert "role 'verifier'" in caplog.text and "keeps the base model" in caplog.text
    assert "easier" in caplog.text and "more training questions" in caplog.text
    assert res.epochs == [] and res.history == [] and not (tmp_path / "ck").exists()
    assert res.counts == {"sft": 0, "sft_heldout": 0, "sft_report": 0, "dpo": 0, "dpo_heldout": 0, "dpo_report": 0}
    assert all(not np.asarray(ab["b"]).any() for ab in res.adapter["layers"].values())  # LoRA b = 0
    _close(res.sft_adapter, res.adapter, rtol=0, atol=0)
    batch = D.pack_sft(_sft_examples(4), TRAIN.max_seq_len)
    pos = causal_positions(*batch["tokens"].shape)
    plain, _ = forward(base, batch["tokens"], pos, CFG)
    adapted, _ = forward(base, batch["tokens"], pos, CFG, lora=res.adapter, lora_scale=lora_scale(LORA))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))


def test_train_role_sft_then_dpo(base, tmp_path, caplog):
    cfg = dataclasses.replace(TRAIN, dpo_reference="base")
    res = train_role(
        base, CFG, LORA, cfg, _sft_examples(12), _dpo_examples(5), "refiner", tmp_path / "ck", progress=False
    )
    hist = res.history
    stages = [h["stage"] for h in hist]
    assert stages == ["sft"] * 2 + ["dpo"]  # ceil(12/8) SFT steps, ceil(5/8) DPO step
    assert all(h["tokens_per_s"] > 0 for h in hist)
    assert abs(hist[2]["rewards/margins"]) > 0  # reference = base, policy = SFT adapter
    assert res.trained and res.counts == {
        "sft": 12,
        "sft_heldout": 0,
        "sft_report": 0,
        "dpo": 5,
        "dpo_heldout": 0,
        "dpo_report": 0,
    }
    assert not any(k.startswith("report/") for e in res.epochs for k in e)  # no report set
    # no held-out sets: every epoch runs, the last is kept; records exist without held-out values
    assert [(e["stage"], e["epoch"], e["best"]) for e in res.epochs] == [
        ("sft", 0, False),
        ("sft", 1, True),
        ("dpo", 0, False),
        ("dpo", 1, True),
    ]
    assert res.epochs[1]["heldout/loss"] is None
    assert res.epochs[1]["train/loss"] == np.mean([h["loss"] for h in hist[:2]])
    assert res.epochs[3]["train/rewards/margins"] == hist[2]["rewards/margins"]
    # re-running on a finished directory resumes at the end: no more steps
    again = train_role(
        base, CFG, LORA, cfg, _sft_examples(12), _dpo_examples(5), "refiner", tmp_path / "ck", progress=False
    )
    assert len(again.history) == 3 and again.epochs == res.epochs
    _close(res.adapter, again.adapter, rtol=0, atol=0)
    _close(res.sft_adapter, again.sft_adapter, rtol=0, atol=0)
    with caplog.at_level("WARNING"):
        h3 = train_role(base, CFG, LORA, cfg, _sft_examples(3), None, "generator", tmp_path / "ck2", progress=False)
    assert [h["stage"] for h in h3.history] == ["sft"] and "skipping dpo stage" in caplog.text
    _close(h3.adapter, h3.sft_adapter, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# schedule and epoch selection


def test_warmup_ratio_sizes_warmup_below_total_and_schedule_peaks_then_decays():
    assert warmup_steps(0.1, 30) == 3 and warmup_steps(0.1, 31) == 4 and warmup_steps(0.01, 10) == 1
    assert warmup_steps(0.9, 5) == 4 and warmup_steps(0.5, 2) == 1  # < total: the decay always runs
    assert warmup_steps(0.0, 10) == 0 and warmup_steps(0.3, 1) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="train.warmup_ratio"):
            TrainConfig(warmup_ratio=bad)
    with pytest.raises(ConfigError, match="train.early_stop_patience"):
        TrainConfig(early_stop_patience=-1)
    cfg = dataclasses.replace(TRAIN, warmup_ratio=0.25, grad_clip=0.0)
    opt = make_optimizer(cfg, 8, learning_rate=1.0)
    params = {"w": np.ones(3, np.float32)}
    st = opt.init(params)
    lrs = []
    for _ in range(8):
        _, st = opt.update({"w": np.ones(3, np.float32)}, st, params)
        lrs.append(float(st[-1].learning_rate))
    assert isinstance(st[-1], ScheduleState) and float(st[-1].warmup) == 2
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert max(lrs) == 1.0 and all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0


def _contradicting(seed=0):
    """SFT training completions '7 x' and held-out completions '7 y' (x, y random): the held-out loss
    first improves (the 7) and then gets worse as the random x are memorised (lr 3e-2, 6 epochs:
    held-out loss 6.72 6.63 6.33 6.16 6.17 6.20 6.21, best epoch 3)."""
    rng = np.random.default_rng(seed)
    tok = lambda lo, hi: list(rng.integers(20, 256, rng.integers(lo, hi)))  # noqa: E731
    train = [D.SFTExample(tok(2, 6), [7] + tok(3, 4)) for _ in range(8)]
    held = [D.SFTExample(tok(2, 6), [7] + tok(3, 4)) for _ in range(6)]
    return train, held


def _preference(n, seed):
    """DPO pairs with a learnable preference: chosen '9 9 9', rejected '11 11 11', random prompts."""
    rng = np.random.default_rng(seed)
    return [D.DPOExample(list(rng.integers(20, 256, rng.integers(2, 6))), [9, 9, 9], [11, 11, 11]) for _ in range(n)]


SEL = dataclasses.replace(
    TRAIN,
    learning_rate=3e-2,
    dpo_learning_rate=3e-2,
    batch_size=4,
    sft_epochs=6,
    dpo_epochs=2,
    checkpoint_every=100,
    early_stop_patience=0,
)
BEST = 3  # the best SFT epoch of _contradicting under SEL (2 steps per epoch)


@pytest.fixture(scope="module")
def sft_after_best(base, tmp_path_factory):
    """The adapter of an independent run (no held-out set, same schedule) after exactly BEST epochs."""
    train, _ = _contradicting()
    res = train_role(
        base,
        CFG,
        LORA,
        SEL,
        train,
        None,
        "generator",
        tmp_path_factory.mktemp("ind"),
        progress=False,
        stop_after_steps=2 * BEST,
    )
    assert len(res.history) == 2 * BEST
    return res.adapter


@pytest.mark.parametrize("patience,last_epoch", [(0, 6), (1, BEST + 1), (2, BEST + 2)])
def test_heldout_selects_best_epoch_and_stops_early(base, tmp_path, sft_after_best, patience, last_epoch):
    train, held = _contradicting()
    cfg = dataclasses.replace(SEL, early_stop_patience=patience)
    res = train_role(base, CFG, LORA, cfg, train, None, "generator", tmp_path / "ck", progress=False, sft_heldout=held)
    ep = res.epochs
    assert [e["epoch"] for e in ep] == list(range(last_epoch + 1)) and {e["stage"] for e in ep} == {"sft"}
    assert len(res.history) == 2 * last_epoch  # stopped after `patience` epochs without improvement
    assert [e["best"] for e in ep] == [e["epoch"] == BEST for e in ep]
    losses = [e["heldout/loss"] for e in ep]
    assert losses[BEST] == min(losses) and losses[1] < losses[0] and all(x > losses[BEST] for x in losses[BEST + 1 :])
    assert ep[0]["train/loss"] is None and ep[0]["learning_rate"] is None and ep[0]["step"] == 0
    for e in ep[1:]:
        steps = [h for h in res.history if h["epoch"] == e["epoch"] - 1]
        assert e["step"] == 2 * e["epoch"] and e["train/loss"] == pytest.approx(np.mean([h["loss"] for h in steps]))
        assert e["learning_rate"] == steps[-1]["learning_rate"] and 0 <= e["heldout/accuracy"] <= 1
    # epoch 0 = the untrained adapter (= the base model), scored independently
    batch = D.pack_sft(held, cfg.max_seq_len)
    logits, _ = forward(base, batch["tokens"], causal_positions(*batch["tokens"].shape), CFG)
    loss0, m0 = sft_loss(logits, batch["targets"], batch["loss_mask"])
    assert ep[0]["heldout/loss"] == pytest.approx(float(loss0), rel=1e-5)
    assert ep[0]["heldout/accuracy"] == pytest.approx(float(m0["accuracy"]), abs=1e-6)
    # the returned adapter is the one of the selected epoch
    _close(res.adapter, sft_after_best, rtol=0, atol=0)
    _close(res.sft_adapter, sft_after_best, rtol=0, atol=0)


def _report_sets():
    """An SFT report set like the held-out one, and DPO report pairs of which 2 (weight 3 each)
    prefer the completion training teaches against: their pair-weighted reward accuracy differs
    from the unweighted share of accurate pairs."""
    _, sft_rep = _contradicting(seed=3)
    flipped = [dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, weight=3.0) for p in _preference(2, 4)]
    return sft_rep, _preference(3, seed=3) + flipped


def test_dpo_starts_from_best_sft_and_heldout_rewards_match_logps(base, tmp_path, sft_after_best):
    """Also: report sets change nothing in the selection (the same selected adapters as without
    them) and are scored at epoch 0 and at the selected epoch only, with the unweighted counts."""
    train, held = _contradicting()
    dpo, dpo_held = _preference(6, seed=1), _preference(5, seed=2)
    sft_rep, dpo_rep = _report_sets()

    def run():
        return train_role(
            base,
            CFG,
            LORA,
            SEL,
            train,
            dpo,
            "generator",
            tmp_path / "ck",
            progress=False,
            sft_heldout=held,
            dpo_heldout=dpo_held,
            sft_report=sft_rep,
            dpo_report=dpo_rep,
        )

    res = run()
    assert res.counts == {"sft": 8, "sft_heldout": 6, "sft_report": 6, "dpo": 6, "dpo_heldout": 5, "dpo_report": 5}
    sft_ep = [e for e in res.epochs if e["stage"] == "sft"]
    assert [e["epoch"] for e in sft_ep if e["best"]] == [BEST] and len(sft_ep) == 7
    _close(res.sft_adapter, sft_after_best, rtol=0, atol=0)
    dp = [e for e in res.epochs if e["stage"] == "dpo"]
    assert [e["epoch"] for e in dp] == [0, 1, 2] and sum(e["best"] for e in dp) == 1
    # epoch 0: policy == reference == the selected SFT adapter
    assert dp[0]["heldout/loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert dp[0]["heldout/rewards/margins"] == pytest.approx(0, abs=1e-5) and dp[0]["train/loss"] is None
    assert dp[-1]["heldout/loss"] < dp[0]["heldout/loss"] and dp[-1]["heldout/rewards/accuracies"] == 1.0
    sft_metrics = heldout_metrics("sft", base, res.sft_adapter, held, CFG, SEL, lora_scale(LORA))
    assert sft_metrics["loss"] == pytest.approx(sft_ep[BEST]["heldout/loss"], rel=1e-6)

    # the selected DPO epoch's held-out rewards, from sequence log-probs computed here
    best = next(e for e in dp if e["best"])
    b = D.pack_dpo(dpo_held, SEL.max_seq_len)
    pos = causal_positions(*b["tokens"].shape)

    def logps(adapter):
        logits, _ = forward(base, b["tokens"], pos, CFG, lora=adapter, lora_scale=lora_scale(LORA))
        return np.asarray(sequence_logps(logits, b["targets"], b["loss_mask"])).reshape(-1, 2)

    pol, ref = logps(res.adapter), logps(res.sft_adapter)
    chosen, rejected = SEL.dpo_beta * (pol[:, 0] - ref[:, 0]), SEL.dpo_beta * (pol[:, 1] - ref[:, 1])
    assert best["heldout/rewards/accuracies"] == pytest.approx(np.mean(chosen > rejected), abs=1e-6)
    assert best["heldout/rewards/margins"] == pytest.approx(np.mean(chosen - rejected), rel=1e-4, abs=1e-4)
    assert best["heldout/rewards/chosen"] == pytest.approx(np.mean(chosen), rel=1e-4, abs=1e-4)
    assert best["heldout/rewards/rejected"] == pytest.approx(np.mean(rejected), rel=1e-4, abs=1e-4)
    expected_loss = np.mean(np.logaddexp(0.0, -(chosen - rejected)))  # -logsigmoid(beta * logits)
    assert best["heldout/loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-5)
    for e in dp[1:]:
        steps = [h for h in res.history if h["stage"] == "dpo" and h["epoch"] == e["epoch"] - 1]
        assert e["train/rewards/accuracies"] == pytest.approx(np.mean([h["rewards/accuracies"] for h in steps]))
        assert e["train/rewards/margins"] == pytest.approx(np.mean([h["rewards/margins"] for h in steps]))
    # the unweighted counts beside the weighted figures (held-out weights are all 1 here)
    assert best["heldout/rewards/accurate_pairs"] == int(np.sum(chosen > rejected)) and best["heldout/pairs"] == 5
    n_tok = sum(len(ex.completion) for ex in held)
    for e in sft_ep:
        assert e["heldout/tokens"] == n_tok and e["heldout/accuracy"] == pytest.approx(
            e["heldout/correct_tokens"] / n_tok
        )

    # report sets: scored only at epoch 0 and at the selected epoch, never choosing one
    assert [e["epoch"] for e in sft_ep if "report/loss" in e] == [0, BEST]
    assert [e["epoch"] for e in dp if "report/loss" in e] == sorted({0, best["epoch"]})
    scale = lora_scale(LORA)
    assert sft_ep[0]["report/loss"] == pytest.approx(
        heldout_metrics("sft", base, None, sft_rep, CFG, SEL, scale)["loss"]
    )
    rep_best = heldout_metrics("sft", base, res.sft_adapter, sft_rep, CFG, SEL, scale)
    assert sft_ep[BEST]["report/loss"] == pytest.approx(rep_best["loss"], rel=1e-6)
    assert sft_ep[BEST]["report/tokens"] == sum(len(ex.completion) for ex in sft_rep) == rep_best["tokens"]
    assert dp[0]["report/loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert (dp[0]["report/rewards/accurate_pairs"], dp[0]["report/pairs"]) == (0, 5)
    b = D.pack_dpo(dpo_rep, SEL.max_seq_len)
    pos = causal_positions(*b["tokens"].shape)
    pol, ref = logps(res.adapter), logps(res.sft_adapter)  # the report pairs now
    right = SEL.dpo_beta * (pol[:, 0] - ref[:, 0]) > SEL.dpo_beta * (pol[:, 1] - ref[:, 1])
    w = np.array([p.weight for p in dpo_rep])
    assert right.tolist() == [True, True, True, False, False]  # the flipped pairs lose
    assert (best["report/rewards/accurate_pairs"], best["report/pairs"]) == (3, 5)
    assert best["report/rewards/accuracies"] == pytest.approx(np.sum(w * right) / np.sum(w)) == pytest.approx(1 / 3)
    # a rerun on the finished directory resumes at the end: the same records, report figures included
    again = run()
    assert again.epochs == res.epochs and len(again.history) == len(res.history)


# ----------------------------------------------------------------------------------------------
# scoring only the completion positions, and the frozen layers computed once


def test_completion_index_lists_scored_positions():
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
    idx, valid = D.completion_index(mask, min_width=2)
    assert idx.shape == (3, 4) and valid.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert idx[0, :2].tolist() == [2, 3] and idx[1].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_completion_scoring_and_frozen_hidden_equal_the_full_step(base, kind):
    """A step that scores only the completion positions, and one whose frozen lower layer comes
    from the HiddenCache, give the same loss, metrics and update as the full forward."""
    from malt_jax.training.role import HiddenCache

    cfg = ModelConfig.tiny(n_layers=2)
    params = numpy_random_params(cfg)
    lcfg = dataclasses.replace(LORA, top_layers=1)
    exs = _sft_examples(8, seed=5) if kind == "sft" else _dpo_examples(8, seed=5)
    batch = D.pack(exs, TRAIN.max_seq_len)
    opt = make_optimizer(TRAIN, 10, 1e-2)
    adapter = jax.tree.map(lambda w: w + 0.05, init_lora(cfg, lcfg, jax.random.key(3)))
    state = TrainState.create(adapter, opt)
    stepper = Stepper(kind, cfg, lcfg, TRAIN, opt)
    ref = np.random.default_rng(0).normal(-20, 2, 16).astype(np.float32) if kind == "dpo" else None
    args = (ref,) if kind == "dpo" else ()
    idx = np.arange(8)
    hid = HiddenCache(params, exs, cfg, TRAIN, layer=1)
    from malt_jax.model import llama

    lengths = [len(e.prompt) + len(e.completion) - 1 for e in exs] if kind == "sft" else None
    want = np.asarray(llama.hidden_at(params, jax.numpy.asarray(batch["tokens"]), cfg, 1))
    got = hid.rows(idx, batch["tokens"].shape[1])
    for r in range(got.shape[0]):  # equal on each row's real positions (zeros after them)
        n = lengths[r] if lengths else int(D.completion_index(batch["loss_mask"])[0][r].max()) + 1
        np.testing.assert_allclose(got[r, :n], want[r, :n], rtol=1e-5, atol=1e-6)
    full = {
        **batch,
        "comp_index": np.tile(np.arange(batch["tokens"].shape[1], dtype=np.int32), (batch["tokens"].shape[0], 1)),
        "comp_valid": np.ones(batch["tokens"].shape, np.float32),
    }  # every position: the old path
    variants = [full, batch, {**batch, "hidden": hid.rows(idx, batch["tokens"].shape[1])}]
    outs = [stepper(params, state, v, *args) for v in variants]
    for new, m in outs[1:]:
        for key in ("loss", "grad_norm") + (("rewards/accuracies", "rewards/margins") if kind == "dpo" else ()):
            assert m[key] == pytest.approx(outs[0][1][key], rel=1e-4, abs=1e-6)
        _close(new.adapter, outs[0][0].adapter, rtol=1e-4, atol=1e-6)
    assert D.completion_index(batch["loss_mask"])[0].shape[1] < batch["tokens"].shape[1]  # fewer positions scored


@pytest.mark.parametrize(
    "top_layers,mesh_shape,rpo",
    [(0, None, 0.0), (1, None, 0.0), (0, {"data": 2, "fsdp": 2, "tensor": 2}, 0.0), (0, None, 0.5)],
)
def test_shared_prompt_dpo_step_equals_interleaved_rows(top_layers, mesh_shape, rpo):
    """One row per pair with the prompt once (pack_dpo_shared) gives the DPO step of pack_dpo's
    interleaved rows: the same loss, metrics and update, with the full forward, with the frozen
    layers' hidden states from the HiddenCache, and sharded; pairs include an empty prompt, a
    truncated one and a padding pair; with ``rpo_alpha`` the chosen completions' token counts
    agree too."""
    from malt_jax.model import llama
    from malt_jax.training.role import HiddenCache

    cfg = ModelConfig.tiny(n_layers=2)
    params = numpy_random_params(cfg)
    lcfg = dataclasses.replace(LORA, top_layers=top_layers)
    exs = _dpo_examples(5, seed=11)
    exs += [D.DPOExample([], [5, 6, 7, 8], [9, 10, 11]), D.DPOExample(list(range(1, 20)), list(range(30, 58)), [7, 8])]
    train = dataclasses.replace(TRAIN, grad_accum=2, rpo_alpha=rpo)
    opt = make_optimizer(train, 10, 1e-2)
    adapter = jax.tree.map(lambda w: w + 0.05, init_lora(cfg, lcfg, jax.random.key(3)))
    state = TrainState.create(adapter, opt)
    ref = np.random.default_rng(1).normal(-20, 2, 16).astype(np.float32)
    inter, shared = D.pack_dpo(exs + [None], train.max_seq_len), D.pack_dpo_shared(exs + [None], train.max_seq_len)
    assert shared["tokens"].size < inter["tokens"].size
    if top_layers:
        idx = np.array(list(range(7)) + [-1])
        hid = HiddenCache(params, exs, cfg, train, layer=1, shared_prompt=True)
        got = hid.rows(idx, shared["tokens"].shape[1])
        pos, seg = shared["positions"], shared["segments"]
        want = np.asarray(llama.hidden_at(params, jax.numpy.asarray(shared["tokens"]), cfg, 1, pos, seg))
        real = seg != D.SEG_PAD
        np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-5)  # other chunking: rounding
        assert not got[~real].any()
        shared = {**shared, "hidden": got}
    s_ref, m_ref = Stepper("dpo", cfg, lcfg, train, opt)(params, state, inter, ref)
    assert ("nll_loss" in m_ref) == (rpo > 0)
    mesh = make_mesh(mesh_shape) if mesh_shape else None
    stepper = Stepper("dpo", cfg, lcfg, train, opt, mesh=mesh)
    s_sh, m_sh = stepper(*stepper.place(params, state), shared, ref)
    for k, v in m_ref.items():
        assert m_sh[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    _close(s_ref.adapter, s_sh.adapter, rtol=1e-4, atol=1e-5)  # Adam's first step: ~lr * sign(grad)


def test_train_role_with_top_layer_adapter_uses_the_frozen_cache(tmp_path, monkeypatch):
    """train_role with adapters on the top layer only equals the same run without the cache."""
    import malt_jax.training.role as T

    cfg = ModelConfig.tiny(n_layers=2)
    params = numpy_random_params(cfg)
    lcfg = dataclasses.replace(LORA, top_layers=1)
    sft, dpo = _sft_examples(12, seed=7), _dpo_examples(6, seed=7)
    a = T.train_role(params, cfg, lcfg, TRAIN, sft, dpo, "refiner", tmp_path / "a", progress=False)
    calls = []
    real = T.HiddenCache
    monkeypatch.setattr(T, "HiddenCache", lambda *a_, **k: calls.append(1) or None)
    b = T.train_role(params, cfg, lcfg, TRAIN, sft, dpo, "refiner", tmp_path / "b", progress=False)
    assert calls and real is not None
    _close(a.adapter, b.adapter, rtol=1e-4, atol=1e-6)
    assert [e["heldout/loss"] for e in a.epochs] == [e["heldout/loss"] for e in b.epochs]


@pytest.mark.parametrize("total,ratio,wd", [(50, 0.1, 0.01), (50, 0.0, 0.0), (7, 0.3, 0.1), (50, 0.02, 0.0)])
def test_optimizer_equals_optax_adamw_with_warmup_cosine(total, ratio, wd):
    import optax

    train_cfg = dataclasses.replace(TRAIN, warmup_ratio=ratio, weight_decay=wd, grad_clip=0.5)
    peak = 3e-3
    ours = make_optimizer(train_cfg, total, peak)
    warmup = warmup_steps(ratio, total)
    sched = optax_schedule(peak, warmup, total)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd))
    # the schedule itself: warmup starts at peak / warmup, reaches peak, cosine decays to ~0
    lrs = np.array([float(sched(t)) for t in range(total)])
    if warmup:
        np.testing.assert_allclose(lrs[:warmup], peak * np.arange(1, warmup + 1) / warmup, rtol=1e-6)
    assert lrs.max() == pytest.approx(peak) and np.all(np.diff(lrs[warmup:]) < 0) and lrs[-1] < 0.2 * peak
    params = {"a": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float32)}
    p_ours, p_ref = jax.tree.map(np.array, params), jax.tree.map(np.array, params)
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    rng = np.random.default_rng(0)
    for t in range(total):
        g = jax.tree.map(
            lambda x, t=t: (rng.normal(size=x.shape) * (3.0 if t % 5 == 0 else 0.1)).astype(np.float32), params
        )  # some steps clipped, some not
        u_ours, s_ours = ours.update(g, s_ours, p_ours)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        _close(u_ours, u_ref, rtol=1e-5, atol=1e-6)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        assert float(_current_lr_of(s_ours)) == pytest.approx(lrs[t], rel=1e-5, abs=1e-6 * peak)
    _close(p_ours, p_ref, rtol=1e-6, atol=1e-6)


def _current_lr_of(state):
    from malt_jax.training.optim import current_lr

    return current_lr(state)


@pytest.mark.parametrize("top_layers,unstack", [(0, True), (1, True), (1, False)])
def test_stepper_place_unstacks_the_adapted_layers_on_one_cpu_device(top_layers, unstack):
    """Without a mesh on CPU, ``Stepper.place`` adds per-layer copies of the adapted layers
    (``train.unstack_layers``); the step is the same with them as with the stacked weights."""
    cfg = ModelConfig.tiny(n_layers=2)
    params = numpy_random_params(cfg)
    lcfg = dataclasses.replace(LORA, top_layers=top_layers)
    train = dataclasses.replace(TRAIN, unstack_layers=unstack)
    opt = make_optimizer(train, 10, 1e-2)
    state = TrainState.create(jax.tree.map(lambda w: w + 0.05, init_lora(cfg, lcfg, jax.random.key(3))), opt)
    stepper = Stepper("sft", cfg, lcfg, train, opt)
    placed, placed_state = stepper.place(params, state)
    if unstack:
        assert len(placed["layers_top"]) == (top_layers or cfg.n_layers)
    else:
        assert "layers_top" not in placed
    batch = D.pack_sft(_sft_examples(8, seed=3), train.max_seq_len)
    s_ref, m_ref = stepper(params, state, batch)
    s_got, m_got = stepper(placed, placed_state, batch)
    for k, v in m_ref.items():
        assert m_got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    _close(s_got.adapter, s_ref.adapter, rtol=1e-5, atol=1e-6)
