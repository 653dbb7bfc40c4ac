"""The logical-axis table, applied: on 8 fake devices ({data: 2, fsdp: 2, tensor: 2}) the compiled
SFT step, DPO step and sampler keep parameters, activations and the KV cache sharded as
``malt_jax.parallel.sharding`` says.

Read from the executables themselves: the input/output shardings of the compiled step, the
sharding constraints in the lowered program (one per declared activation), and the per-device
buffer shapes XLA allocated after partitioning (a constrained activation appears at its
per-device size, e.g. the residual stream at batch / 4 with the full width).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from malt_jax.config import LoraConfig, ModelConfig, SamplingConfig, TrainConfig
from malt_jax.model.llama import init_params
from malt_jax.model.lora import init_lora
from malt_jax.parallel.distributed import put
from malt_jax.parallel.sharding import ACTIVATION_AXES, constrain, make_mesh, mesh_context, param_shardings, spec_for
from malt_jax.sampling import decode as sampling
from malt_jax.training import data as D
from malt_jax.training.role import Stepper, TrainState, make_optimizer, state_shardings

B = 8  # examples per step (DPO: pairs)
CFG = ModelConfig.tiny(n_layers=2)  # dim 64, 4 heads / 2 KV heads of 16, ffn 128, vocab 256
LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w_up"))
TRAIN = TrainConfig(batch_size=B, max_seq_len=32)
BATCH = ("data", "fsdp")


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _sdy(spec: P, ndim: int) -> str:
    """A PartitionSpec as Shardy prints it: ``[{"data", "fsdp"}, {}, {"tensor"}]``."""
    dims = list(spec) + [None] * (ndim - len(spec))
    out = []
    for d in dims:
        axes = () if d is None else (d,) if isinstance(d, str) else tuple(d)
        out.append("{" + ", ".join(f'"{a}"' for a in axes) + "}")
    return "[" + ", ".join(out) + "]"


def _constraints(lowered) -> set[tuple[str, tuple[int, ...]]]:
    """(sharding, global shape) of every sharding constraint in the lowered program."""
    found = re.findall(r"sdy\.sharding_constraint [^<]*<@\w+, (\[.*?\])> : tensor<([\dx]+)x\w+>", lowered.as_text())
    return {(sh, tuple(int(d) for d in shape.split("x"))) for sh, shape in found}


def _buffers(compiled) -> set[str]:
    """The f32 buffer shapes of the partitioned (per-device) program."""
    return set(re.findall(r"f32\[[\d,]+\]", compiled.as_text()))


def _expect(kind: str, shape: tuple[int, ...], mesh) -> tuple[str, tuple[int, ...]]:
    return _sdy(spec_for(ACTIVATION_AXES[kind], shape, mesh), len(shape)), shape


def _same(a, b, tree) -> None:
    for x, sa, sb in zip(jax.tree.leaves(tree), jax.tree.leaves(a), jax.tree.leaves(b)):
        assert sa.is_equivalent_to(sb, np.ndim(x)), (sa, sb)


def _step(kind: str, mesh):
    rng = np.random.default_rng(0)
    tok = lambda lo, hi: [int(t) for t in rng.integers(1, 200, rng.integers(lo, hi))]  # noqa: E731
    opt = make_optimizer(TRAIN, 10)
    stepper = Stepper(kind, CFG, LORA, TRAIN, opt, mesh=mesh)
    base = init_params(CFG, jax.random.key(0))
    base, state = stepper.place(base, TrainState.create(init_lora(CFG, LORA, jax.random.key(1)), opt))
    if kind == "sft":
        batch = D.pack_sft([D.SFTExample(tok(3, 8), tok(3, 9)) for _ in range(B)], TRAIN.max_seq_len)
        lowered = stepper.lower(base, state, batch)
    else:
        batch = D.pack_dpo([D.DPOExample(tok(3, 8), tok(3, 9), tok(3, 9)) for _ in range(B)], TRAIN.max_seq_len)
        lowered = stepper.lower(base, state, batch, np.zeros(2 * B, np.float32))
    return base, state, batch, lowered


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_training_steps_keep_the_tables_shardings(kind, mesh):
    base, state, batch, lowered = _step(kind, mesh)
    rows, T = batch["tokens"].shape
    assert rows == (2 * B if kind == "dpo" else B)
    compiled = lowered.compile()
    # parameters in, training state in and out: as the tables say
    in_sh = compiled.input_shardings[0]
    _same(in_sh[0], param_shardings(base, mesh), base)
    _same(in_sh[1], state_shardings(state, mesh), state)
    _same(compiled.output_shardings[0], state_shardings(state, mesh), state)
    assert in_sh[0]["layers"]["w_up"].spec == P(None, "fsdp", "tensor")
    assert in_sh[2]["tokens"].spec == P(BATCH, None)
    # activations: each declared constraint is in the program...
    cons = _constraints(lowered)
    dim, H, K, hd, F, V = CFG.dim, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.hidden_dim, CFG.vocab_size
    expected = {"residual": (rows, T, dim), "q": (rows, T, H, hd), "kv": (rows, T, K, hd), "ffn": (rows, T, F)}
    for name, shape in expected.items():
        assert _expect(name, shape, mesh) in cons, (name, sorted(cons))
    assert _expect("residual", (rows, T, dim), mesh)[0] == '[{"data", "fsdp"}, {}, {}]'
    assert _expect("q", (rows, T, H, hd), mesh)[0] == '[{"data", "fsdp"}, {}, {"tensor"}, {}]'
    logits = [c for c in cons if c[1][-1] == V]
    assert logits and all(c[0].startswith('[{"data", "fsdp"}') and c[0].endswith('{"tensor"}]') for c in logits)
    # ... and XLA allocated them at their per-device size: batch / 4, heads / ffn / vocab / 2
    bufs = _buffers(compiled)
    assert f"f32[{rows // 4},{T},{dim}]" in bufs  # the residual stream: split rows, full width
    assert f"f32[{rows // 4},{T},{F // 2}]" in bufs  # MLP hidden units over tensor
    assert f"f32[{rows},{T},{V}]" not in bufs  # logits never materialised whole on one device


def test_decode_keeps_the_cache_and_activations_sharded(mesh):
    rng = np.random.default_rng(1)
    rows, prompt, new = 8, 8, 8
    params = put(
        init_params(CFG, jax.random.key(0)),
        param_shardings(jax.eval_shape(lambda: init_params(CFG, jax.random.key(0))), mesh),
    )
    bsh = NamedSharding(mesh, P(BATCH))
    x = put(rng.integers(1, 200, (rows, prompt)).astype(np.int32), NamedSharding(mesh, P(BATCH, None)))
    n = put(np.full(rows, prompt, np.int32), bsh)
    keys = put(sampling.row_keys(0, rows), bsh)
    with mesh_context(mesh):
        lowered = sampling.generate.lower(
            params, x, n, keys, cfg=CFG, sampling=SamplingConfig(temperature=1.0), max_new_tokens=new
        )
    cache_shape = (CFG.n_layers, rows, CFG.n_kv_heads, prompt + new, CFG.head_dim)
    cons = _constraints(lowered)
    assert ('[{}, {"data", "fsdp"}, {"tensor"}, {}, {}]', cache_shape) in cons  # the KV cache's axes
    assert _expect("residual", (rows, 1, CFG.dim), mesh) in cons  # a decode step's residual stream
    compiled = lowered.compile()
    bufs = _buffers(compiled)
    L, _, K, S, hd = cache_shape
    assert f"f32[{L},{rows // 4},{K // 2},{S},{hd}]" in bufs  # per-device cache: rows / 4, KV heads / 2
    assert f"f32[{L},{rows},{K},{S},{hd}]" not in bufs
    gen_sh = compiled.output_shardings
    assert gen_sh.tokens.spec[0] == BATCH  # samples stay split over the batch axes


def test_constrain_is_a_no_op_without_a_mesh_and_checks_rank(mesh):
    x = np.ones((4, 3, 64), np.float32)
    assert constrain(x, "residual") is x
    with (
        mesh_context(mesh),
        pytest.raises(ValueError, match=r"constrain\('q'\): 4 logical axes for an array of shape \(4, 3, 64\)"),
    ):
        jax.jit(lambda a: constrain(a, "q"))(x)
