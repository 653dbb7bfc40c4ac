"""The learning-curve study on a tiny random model: nested sizes, shared baselines, summaries."""

import json

import pytest

from malt_jax.config import ConfigError, load_run_config
from malt_jax.model.base_model import load_model
from malt_jax.workflows.study import run_study, size_dir
from tests.parity_task import ParityTask

CONFIG = """
name: tiny-study
model_preset: tiny
weights: random
run_dir: {run_dir}
task: {{name: parity, num_train: 4, num_eval: 6, options: {{train_split: train, eval_split: test}}}}
sampling: {{temperature: 1.0, max_new_tokens: 6}}
tree: {{n: 2, m: 2, l: 2, questions_per_batch: 2}}
lora: {{rank: 2, targets: [wq, wv]}}
train: {{sft_epochs: 2, dpo_epochs: 1, batch_size: 4, max_seq_len: 128, checkpoint_every: 2, heldout_fraction: 0.25}}
eval: {{votes: 3, max_new_tokens: 6, bootstrap_samples: 100}}
study: {{train_sizes: [2, 4], results: {results}}}
"""


def _cfg(tmp_path, **fmt):
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG.format(run_dir=tmp_path / "out", results=tmp_path / "results", **fmt))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = load_run_config(_cfg(tmp))
    model = load_model("random", cfg.model)
    out = run_study(cfg, progress=False, command="malt-jax study cfg.yaml", model=model, task=ParityTask())
    return tmp, cfg, model, out


def test_summaries_follow_the_schema(study):
    tmp, cfg, _, out = study
    assert out["train_sizes"] == [2, 4] and out["n_eval"] == 6
    for k in (2, 4):
        s = json.loads((tmp / "results" / f"tiny-study_n{k:04d}.json").read_text())
        for key in ("experiment", "command", "n_train", "n_eval", "systems", "comparisons", "training", "wall_time_s"):
            assert key in s
        assert s["n_train"] == k and s["command"] == "malt-jax study cfg.yaml"
        assert set(s["systems"]) >= {
            "single",
            "single+MV@3",
            "chain",
            "chain+MV@3",
            "malt",
            "malt+MV@3",
            "single-greedy",
        }
        # the SFT-only chain is evaluated at the largest size only (study.sft_chain: largest)
        assert ("sft-chain+MV@3" in s["systems"]) == (k == 4)
        for v in s["systems"].values():
            assert set(v) >= {"accuracy", "ci95", "correct"} and v["correct"] == round(v["accuracy"] * 6)
        primary = [c for c in s["comparisons"] if c["primary"]]
        assert [(c["a"], c["b"]) for c in primary] == [("malt+MV@3", "single+MV@3")]
        assert all({"a", "b", "diff", "p", "p_holm"} <= set(c) for c in s["comparisons"])
        assert all(c["p_holm"] >= c["p"] for c in s["comparisons"] if not c["primary"])
        for role in ("G", "V", "R"):
            assert {"heldout_dpo_accuracy", "heldout_sft_loss_start", "heldout_sft_loss_end"} <= set(
                s["training"][role]
            )
        assert set(s["verifier"]) == ({"chain", "sft-chain", "malt"} if k == 4 else {"chain", "malt"})
    assert (tmp / "results" / "tiny-study.png").stat().st_size > 1000


def test_sizes_are_nested_and_baselines_shared(study):
    tmp, cfg, _, out = study
    run_dir = tmp / "out"
    small = json.loads((size_dir(run_dir, 2) / "credit" / "summary.json").read_text())
    large = json.loads((size_dir(run_dir, 4) / "credit" / "summary.json").read_text())
    assert small["questions"] == 2 and large["questions"] == 4
    # the first two trees are the same in both sizes: their SFT rows are a prefix of the larger set's
    small_g = (size_dir(run_dir, 2) / "credit" / "G_sft.jsonl").read_text().splitlines()
    large_g = (size_dir(run_dir, 4) / "credit" / "G_sft.jsonl").read_text().splitlines()
    assert large_g[: len(small_g)] == small_g
    # baselines: sampled once, the same rows in every size
    for k in (2, 4):
        assert (size_dir(run_dir, k) / "eval" / "chain.jsonl").read_text() == (
            run_dir / "eval" / "chain.jsonl"
        ).read_text()
    for name in ("single", "chain", "single-greedy"):
        assert (
            out["baselines"][name]["accuracy"]
            == json.loads((tmp / "results" / "tiny-study_n0002.json").read_text())["systems"][name]["accuracy"]
        )


def test_rerun_resumes_without_work(study):
    tmp, cfg, model, out = study
    again = run_study(cfg, progress=False, command="malt-jax study cfg.yaml", model=model, task=ParityTask())
    assert again["curve"] == out["curve"]
    assert again["this_call_s"] < 30


def test_sizes_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="study.train_sizes"):
        load_run_config(_cfg(tmp_path), ["study.train_sizes=[2, 8]"])
    with pytest.raises(ConfigError, match="study.train_sizes"):
        load_run_config(_cfg(tmp_path), ["study.train_sizes=[0]"])
    with pytest.raises(ConfigError, match="study.sft_chain"):
        load_run_config(_cfg(tmp_path), ["study.sft_chain=some"])
