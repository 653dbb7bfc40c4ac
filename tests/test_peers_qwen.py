"""Tiny random Qwen2 / Qwen3 models made by transformers at test time (save_pretrained, no
downloads) load in malt-jax with the same logits (rtol 1e-4) and the same greedy tokens
(the peers env: make peers && make test-peers)."""

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.peers
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from malt_jax.config import SamplingConfig  # noqa: E402
from malt_jax.model import llama, weights  # noqa: E402
from malt_jax.sampling import decode as sampling  # noqa: E402


def _model(arch, tied):
    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        torch_dtype="float32",
    )
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=32, use_sliding_window=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial biases / norms (they initialise to 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith(("bias", "q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_transformers_qwen_logits_and_greedy_tokens(tmp_path, arch, tied):
    model = _model(arch, tied)
    model.save_pretrained(tmp_path, safe_serialization=True)
    params, cfg = weights.load_hf(tmp_path)
    assert cfg.arch == arch and cfg.tie_embeddings == tied
    tokens = np.array([[3, 17, 99, 5, 42, 7, 250, 11]])
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got, _ = llama.forward(params, jnp.asarray(tokens), llama.causal_positions(1, tokens.shape[1]), cfg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(tokens), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, tokens.shape[1] :].numpy()
    x, n = sampling.pad_batch([tokens[0].tolist()])
    gen = sampling.generate(
        params,
        jnp.asarray(x),
        jnp.asarray(n),
        sampling.row_keys(0, 1),
        cfg=cfg,
        sampling=SamplingConfig(greedy=True),
        stop=sampling.StopCriteria(()),
        max_new_tokens=12,
    )
    assert sampling.trim(gen)[0] == ref.tolist()
