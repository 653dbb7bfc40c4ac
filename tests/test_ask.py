"""malt-jax ask: N G -> V -> R chains of a run's team on one question, streamed per role, voted."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from malt_jax.cli import main
from malt_jax.config import load_run_config, run_config_of
from malt_jax.model.base_model import load_model
from malt_jax.model.lora import init_lora, lora_scale
from malt_jax.roles import ROLES
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec
from malt_jax.stages.expand import decode_tree, sample_trees
from malt_jax.stages.rundir import load_adapters, prepare_run_dir, save_adapter
from malt_jax.tasks import Example
from malt_jax.workflows.ask import ask, ask_run
from malt_jax.workflows.pipeline import make_task

CONFIG = """
name: ask
model_preset: tiny
weights: random
run_dir: {run_dir}
task: {{name: synthetic, framing: {framing}, options: {{style: inverse}}}}
sampling: {{temperature: 1.0, max_new_tokens: 8, role_max_new_tokens: [8, 6, 4]}}
lora: {{rank: 2, alpha: 4.0, targets: [wq, wv], top_layers: 1}}
eval: {{temperature: 1.0, max_new_tokens: 8}}
"""


def _run(tmp_path, framing="separate", trained=True):
    path = tmp_path / f"{framing}.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / f"run-{framing}", framing=framing))
    cfg = load_run_config(path)
    run_dir = prepare_run_dir(cfg)
    if trained:
        model = load_model(cfg.weights, cfg.model)
        (run_dir / "adapters").mkdir()
        for i, role in enumerate(ROLES):
            ad = jax.tree.map(lambda x, i=i: x + 0.05 * (i + 1), init_lora(model.cfg, cfg.lora, jax.random.key(i)))
            save_adapter(ad, run_dir / "adapters" / f"{role}.safetensors")
    return run_dir


@pytest.mark.parametrize("framing", ["separate", "chat"])
def test_ask_streams_each_role_and_equals_the_sampler(tmp_path, framing):
    run_dir = _run(tmp_path, framing)
    seen = []
    out = ask_run(run_dir, "What is 42 - 17?", votes=3, on_turn=lambda role, texts: seen.append((role, texts)))
    assert [r for r, _ in seen] == ["G", "V", "R"] and all(len(t) == 3 for _, t in seen)
    assert [c["R"] for c in out["chains"]] == seen[2][1] and out["votes"] == 3 and out["trained"]
    assert out["answer"] in out["answers"] or out["answer"] is None
    assert out["votes_for"] == (out["answers"].count(out["answer"]) if out["answer"] is not None else 0)
    # the same samples as the sampler without the per-level callback (streaming changes nothing)
    cfg = run_config_of(run_dir)
    model, task = load_model(cfg.weights, cfg.model), make_task(cfg)
    adapters, _ = load_adapters(run_dir)
    codec = PromptCodec(model.tokenizer, task, framing)
    spec = ExpansionSpec(
        n=3,
        m=1,
        l=1,
        depth=3,
        max_new=(8, 6, 4),
        stop=codec.stop,
        mode="fork",
        sampling=dataclasses.replace(cfg.sampling, temperature=1.0),
    )
    got = {}
    sample_trees(
        model,
        codec,
        [Example(id="ask", question="What is 42 - 17?", answer="")],
        spec,
        seed=0,
        batch_size=1,
        adapters=tuple(adapters[r] for r in ROLES),
        lora_scale=lora_scale(cfg.lora),
        progress=False,
        on_batch=lambda b, arrays: got.update(decode_tree(codec, arrays, ROLES)),
    )
    for role in ROLES:
        assert [c[role] for c in out["chains"]] == np.asarray(got[role]).reshape(-1).tolist()
    base = ask(
        model, task, "What is 42 - 17?", None, votes=2, temperature=0.0, max_new_tokens=(4, 4, 4), framing=framing
    )
    assert len(base["chains"]) == 2 and base["chains"][0] == base["chains"][1]  # greedy: identical chains


def test_ask_cli_errors_and_json(tmp_path, capsys):
    bare = _run(tmp_path, trained=False)
    assert main(["ask", str(bare), "What is 3 - 1?"]) == 2
    err = capsys.readouterr().err
    assert "no trained role adapters" in err and "--base" in err and len(err.strip().splitlines()) == 1
    assert main(["ask", str(bare), "What is " + "9 + " * 400 + "1?", "--base"]) == 2
    err = capsys.readouterr().err
    assert "context of 512 tokens" in err and len(err.strip().splitlines()) == 1
    assert main(["ask", str(tmp_path / "nowhere"), "What is 3 - 1?"]) == 2
    assert "not a malt-jax run directory" in capsys.readouterr().err
    assert main(["ask", str(bare), "What is 3 - 1?", "--base", "--votes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trained"] is False and len(out["chains"]) == 2 and set(out["chains"][0]) == {"G", "V", "R"}
    assert main(["ask", str(bare), "What is 3 - 1?", "--base", "--votes", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("]")[1].split(":")[0].strip() for ln in lines[:6]] == ["generator"] * 2 + ["verifier"] * 2 + [
        "refiner"
    ] * 2
    assert lines[-1].startswith("answer: ") and "untrained chain" in lines[-1]
