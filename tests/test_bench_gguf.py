"""The GGUF files the llama.cpp benchmark (bench/vs_llamacpp.py) decodes hold the weights malt-jax
decodes: its F32 re-write of a quantized GGUF loads back bit-identical, its Q8_0 re-write stores
Q8_0 matrices within Q8_0 rounding, both with the same model shape (the metadata is copied)."""

import sys
from pathlib import Path

import jax
import numpy as np

from malt_jax.config import ModelConfig
from malt_jax.model import weights
from tests.fixtures import numpy_random_params, write_gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from vs_llamacpp import write_gguf as rewrite_gguf  # noqa: E402


def test_rewrite_f32_is_exact_and_q8_within_rounding(tmp_path):
    cfg = ModelConfig.tiny(vocab_size=256, dim=64, hidden_dim=128)
    params = numpy_random_params(cfg)
    hf_dir = weights.save_hf(params, cfg, tmp_path / "hf")
    from safetensors.numpy import load_file

    hf = {k: v for f in sorted(Path(hf_dir).glob("*.safetensors")) for k, v in load_file(f).items()}
    src = write_gguf(tmp_path / "q.gguf", cfg, hf, quantize=True)  # a quantized source, like the embedded file
    ref, ref_cfg = weights.load_gguf(src)

    f32, f32_cfg = weights.load_gguf(rewrite_gguf(src, tmp_path / "f32.gguf", "F32"))
    assert f32_cfg == ref_cfg
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(f32)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    q8, q8_cfg = weights.load_gguf(rewrite_gguf(src, tmp_path / "q8.gguf", "Q8_0"))
    assert q8_cfg == ref_cfg
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(q8)):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim < 2 or a.shape[-1] < 32:  # norms stay F32
            np.testing.assert_array_equal(a, b)
        else:  # Q8_0: blocks of 32 with scale max|w| / 127, rounding error <= scale / 2
            assert np.abs(a - b).max() <= np.abs(a).max() / 127 / 2 * 1.01
    import gguf

    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert kinds["blk.0.ffn_up.weight"] == "Q8_0" and kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert (tmp_path / "q8.gguf").stat().st_size < (tmp_path / "f32.gguf").stat().st_size / 3
