"""Exported adapters in transformers + peft (the peers env: make peers && make test-peers).

A run directory with random role adapters on a tiny random model is exported; transformers
loads the exported base with each role's PEFT adapter, and each merged checkpoint, and their
logits must equal malt-jax's with the adapter (rtol 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.peers
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from malt_jax.config import load_run_config  # noqa: E402
from malt_jax.model.llama import causal_positions, forward  # noqa: E402
from malt_jax.model.lora import init_lora, lora_scale  # noqa: E402
from malt_jax.workflows import pipeline  # noqa: E402
from malt_jax.workflows.export import export_run  # noqa: E402

CONFIG = """
name: export-peers
model_preset: tiny
weights: random
run_dir: {run_dir}
lora: {{rank: 4, alpha: 8.0, targets: [wq, wk, wv, wo, w_gate, w_up, w_down], top_layers: {top}}}
"""


@pytest.mark.parametrize("top", [0, 1])
def test_peft_and_merged_logits_equal_malt_jax(tmp_path, top):
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "run", top=top))
    cfg = load_run_config(path)
    run_dir = pipeline.prepare_run_dir(cfg)
    model = pipeline.load_model(cfg.weights, cfg.model)
    (run_dir / "adapters").mkdir()
    rng = np.random.default_rng(0)
    adapters = {}
    for i, role in enumerate(pipeline.ROLES):
        ad = init_lora(model.cfg, cfg.lora, jax.random.key(i))
        ad = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), jnp.float32), ad)
        pipeline.save_adapter(ad, run_dir / "adapters" / f"{role}.safetensors")
        adapters[role] = ad
    written = export_run(run_dir, tmp_path / "out", "both")
    tokens = np.array([[5, 9, 300, 2, 11, 47, 8]])
    for role, ad in adapters.items():
        want, _ = forward(
            model.params,
            jnp.asarray(tokens),
            causal_positions(1, tokens.shape[1]),
            model.cfg,
            lora=ad,
            lora_scale=lora_scale(cfg.lora),
        )
        want = np.asarray(want)
        base = transformers.AutoModelForCausalLM.from_pretrained(written["base"], torch_dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, written[role]).eval()
        with torch.no_grad():
            got = with_adapter(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            written[f"{role}-merged"], torch_dtype=torch.float32
        ).eval()
        with torch.no_grad():
            got_m = merged(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(got_m, want, rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(written["base"])
    assert tok("What is 2 + 3?", add_special_tokens=False)["input_ids"] == model.tokenizer.encode(
        "What is 2 + 3?", add_special_tokens=False
    )
