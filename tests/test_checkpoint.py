"""Orbax checkpoints: exact resume (step level, sharded; and train_role level), shape checks, atomicity."""

import dataclasses

import jax
import numpy as np
import pytest

from malt_jax.config import LoraConfig, ModelConfig, TrainConfig
from malt_jax.model.lora import init_lora
from malt_jax.parallel.sharding import make_mesh
from malt_jax.runtime.checkpoint import Checkpointer, CheckpointError
from malt_jax.training import data as D
from malt_jax.training.role import Stepper, TrainState, make_optimizer, state_shardings, train_role
from tests.fixtures import numpy_random_params

CFG = ModelConfig.tiny(n_layers=1)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_down"))  # few leaves: faster compiles
TRAIN = TrainConfig(
    learning_rate=1e-2,
    dpo_learning_rate=1e-2,
    warmup_ratio=0.5,
    batch_size=8,
    grad_accum=1,
    max_seq_len=32,
    sft_epochs=2,
    dpo_epochs=3,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def base():
    return numpy_random_params(CFG)


def _examples(seed=0):
    rng = np.random.default_rng(seed)
    tok = lambda lo, hi: list(rng.integers(1, 256, rng.integers(lo, hi)))  # noqa: E731
    return (
        [D.SFTExample(tok(2, 8), tok(2, 9)) for _ in range(12)],
        [D.DPOExample(tok(2, 8), tok(2, 9), tok(2, 9)) for _ in range(5)],
    )


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_step_level_resume_is_exact_with_sharded_restore(base, tmp_path):
    """2k steps straight == k steps, save, restore into a fresh (sharded) TrainState, k more."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    k, sft = 2, _examples()[0]
    opt = make_optimizer(TRAIN, 2 * k, TRAIN.learning_rate)
    step = Stepper("sft", CFG, LORA, TRAIN, opt, mesh=mesh, role="generator")
    fresh = lambda: TrainState.create(init_lora(CFG, LORA, jax.random.key(7)), opt)  # noqa: E731
    batches = [
        D.pack_sft(D.gather(sft, idx), TRAIN.max_seq_len)
        for _, idx in D.epoch_batches(len(sft), TRAIN.batch_size, seed=0, epoch=0)
    ] * 2
    b_sh, straight = step.place(base, fresh())
    for i in range(2 * k):
        straight, _ = step(b_sh, straight, batches[i])

    _, st = step.place(base, fresh())
    for i in range(k):
        st, _ = step(b_sh, st, batches[i])
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(k, {"state": st}, {"stage": "sft", "stage_step": k})
    del st
    target = {"state": fresh()}  # fresh, unsharded: restore puts arrays straight into the shardings
    with Checkpointer(tmp_path / "ck") as ck:
        restored, meta = ck.restore(target, shardings={"state": state_shardings(target["state"], mesh)})
    st = restored["state"]
    assert meta["stage_step"] == k and int(st.step) == k
    wq_a = st.adapter["layers"]["wq"]["a"]
    assert wq_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    for i in range(k, 2 * k):
        st, _ = step(b_sh, st, batches[i])
    _equal(straight, st)


def _same_result(a, b):
    _equal(a.adapter, b.adapter)
    _equal(a.sft_adapter, b.sft_adapter)
    assert a.epochs == b.epochs and a.counts == b.counts and a.trained == b.trained
    assert [(h["stage"], h["step"], h["loss"]) for h in a.history] == [
        (h["stage"], h["step"], h["loss"]) for h in b.history
    ]


def test_train_role_resume_is_exact(base, tmp_path):
    """Preempted runs (mid-SFT; mid-DPO with stored reference log-probs) resume bit-exactly."""
    sft, dpo = _examples()
    full = train_role(base, CFG, LORA, TRAIN, sft, dpo, "verifier", tmp_path / "straight", progress=False)
    assert [h["stage"] for h in full.history] == ["sft"] * 4 + ["dpo"] * 3
    for stop in (3, 7):  # last checkpoints: SFT step 2 (global 2) and DPO step 2 (global 6)
        d = tmp_path / f"stop{stop}"
        part = train_role(base, CFG, LORA, TRAIN, sft, dpo, "verifier", d, progress=False, stop_after_steps=stop)
        assert len(part.history) == stop
        resumed = train_role(base, CFG, LORA, TRAIN, sft, dpo, "verifier", d, progress=False)
        _same_result(full, resumed)
    with Checkpointer(tmp_path / "straight") as ck:
        assert len(ck.all_steps()) == 2  # max_to_keep
        meta = ck.metadata()
    assert meta["stage"] == "dpo" and meta["stage_step"] == meta["stage_total"] == 3
    assert meta["role"] == "verifier" and meta["epoch"] == 3 and meta["batch_in_epoch"] == 0
    assert meta["epochs"] == full.epochs and meta["stage_done"]
    with pytest.raises(ValueError, match="belongs to role 'verifier'"):
        train_role(base, CFG, LORA, TRAIN, sft, dpo, "refiner", tmp_path / "straight", progress=False)


def _heldout_examples():
    """SFT whose held-out loss improves for 3 epochs, then worsens (completions '7 x' / '7 y'), and
    learnable DPO pairs ('9 9 9' over '11 11 11'); 2 steps per epoch at batch size 4."""
    rng = np.random.default_rng(0)
    tok = lambda lo, hi: list(rng.integers(20, 256, rng.integers(lo, hi)))  # noqa: E731
    sft = [D.SFTExample(tok(2, 6), [7] + tok(3, 4)) for _ in range(8)]
    sft_ho = [D.SFTExample(tok(2, 6), [7] + tok(3, 4)) for _ in range(6)]
    pair = lambda: D.DPOExample(tok(2, 6), [9, 9, 9], [11, 11, 11])  # noqa: E731
    return sft, sft_ho, [pair() for _ in range(6)], [pair() for _ in range(5)]


HELD = dataclasses.replace(
    TRAIN,
    learning_rate=3e-2,
    dpo_learning_rate=3e-2,
    warmup_ratio=0.1,
    batch_size=4,
    sft_epochs=6,
    dpo_epochs=2,
    early_stop_patience=2,
)


def _train_heldout(base, run_dir, **kw):
    """train_role on ``_heldout_examples()`` with held-out sets (``kw``: report sets, stops)."""
    sft, sft_ho, dpo, dpo_ho = _heldout_examples()
    return train_role(
        base,
        CFG,
        LORA,
        HELD,
        sft,
        dpo,
        "generator",
        run_dir,
        progress=False,
        sft_heldout=sft_ho,
        dpo_heldout=dpo_ho,
        **kw,
    )


def test_train_role_resume_with_heldout_is_exact(base, tmp_path):
    """With held-out sets (best-epoch selection, early stopping, held-out DPO reference log-probs),
    runs preempted anywhere resume to the same adapters and epoch records."""
    sft, sft_ho, dpo, dpo_ho = _heldout_examples()

    def run(d, **kw):
        return _train_heldout(base, d, **kw)

    full = run(tmp_path / "straight")
    sft_ep = [e for e in full.epochs if e["stage"] == "sft"]
    best = [e["epoch"] for e in sft_ep if e["best"]]
    assert best == [3] and len(sft_ep) == 6  # epochs 0..5: stopped 2 epochs after the best
    assert [h["stage"] for h in full.history] == ["sft"] * 10 + ["dpo"] * 4
    assert [e["epoch"] for e in full.epochs if e["stage"] == "dpo"] == [0, 1, 2]
    # stops: mid-epoch, right after the best epoch, after the early stop (before DPO's first
    # step), mid-DPO; the last checkpoints are at even global steps
    for stop in (3, 7, 10, 13):
        d = tmp_path / f"stop{stop}"
        part = run(d, stop_after_steps=stop)
        assert len(part.history) == stop
        _same_result(full, run(d))
    with Checkpointer(tmp_path / "straight") as ck:
        meta = ck.metadata()
    assert meta["stage"] == "dpo" and meta["n_heldout"] == 5 and meta["epochs"] == full.epochs
    with pytest.raises(ValueError, match="cannot be resumed exactly"):
        train_role(
            base,
            CFG,
            LORA,
            HELD,
            sft,
            dpo,
            "generator",
            tmp_path / "stop13",
            progress=False,
            sft_heldout=sft_ho,
            dpo_heldout=dpo_ho[:3],
        )


def test_train_role_resume_with_report_sets_is_exact(base, tmp_path):
    """Report sets (scored when a stage ends, never choosing an epoch) leave the checkpoints'
    resume exact: preempted in SFT or in DPO, the rerun gives the same adapters and epoch records,
    report figures included (a DPO stage resumed from its checkpoint scores its report pairs
    against the restored SFT adapter)."""
    rng = np.random.default_rng(5)
    sft_rep = [D.SFTExample(list(rng.integers(20, 256, 4)), [7, 30, 40]) for _ in range(3)]
    dpo_rep = [D.DPOExample(list(rng.integers(20, 256, 3)), [9, 9, 9], [11, 11, 11]) for _ in range(3)]

    def run(d, **kw):
        return _train_heldout(base, d, sft_report=sft_rep, dpo_report=dpo_rep, **kw)

    full = run(tmp_path / "straight")
    assert {e["stage"] for e in full.epochs if "report/loss" in e} == {"sft", "dpo"}
    for stop in (7, 13):  # mid-SFT after the best epoch; mid-DPO
        d = tmp_path / f"stop{stop}"
        assert len(run(d, stop_after_steps=stop).history) == stop
        _same_result(full, run(d))


def test_shape_mismatch_names_tensor(tmp_path):
    ad = init_lora(CFG, LORA, jax.random.key(0))
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, {"adapter": ad}, {"stage": "sft"})
    other = init_lora(dataclasses.replace(CFG, dim=32, head_dim=8), LORA, jax.random.key(0))
    with Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(
            CheckpointError,
            match=r"tensor 'adapter/layers/w_down/b' has shape \(1, 4, 64\) in the checkpoint but \(1, 4, 32\)",
        ):
            ck.restore({"adapter": other})
        with pytest.raises(CheckpointError, match="no tensor 'adapter/layers/wk/a'"):
            ck.restore(
                {"adapter": init_lora(CFG, LoraConfig(rank=4, targets=("wq", "wk", "wv", "w_down")), jax.random.key(0))}
            )
        restored, meta = ck.restore({"adapter": jax.eval_shape(lambda: ad)})  # abstract target works too
    _equal(restored["adapter"], ad)
    assert meta["stage"] == "sft" and meta["format"].startswith("malt-jax")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpointer(tmp_path / "empty").restore({"adapter": ad})


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    ad = init_lora(CFG, LORA, jax.random.key(0))
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(4, {"adapter": ad}, {"stage": "sft"})
    # what a save killed half-way leaves behind: an uncommitted temporary directory
    tmp = tmp_path / "ck" / "6.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() == 4
        restored, _ = ck.restore({"adapter": ad})
    _equal(restored["adapter"], ad)
