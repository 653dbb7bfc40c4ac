"""The role ablation "G and R trained, empty critique" (``malt-GR0``): the chain G -> (no critique)
-> R as an evaluation system, on a tiny random model."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from malt_jax.config import SamplingConfig, load_run_config
from malt_jax.model.base_model import load_model
from malt_jax.model.lora import init_lora
from malt_jax.sampling import decode as sampling
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec, _child_keys
from malt_jax.stages.eval import (
    ABLATIONS,
    EMPTY_CRITIQUE,
    System,
    critique_verdict,
    default_systems,
    role_skills,
    run_eval,
    system_results,
)
from malt_jax.stages.expand import decode_tree, question_keys, sample_trees
from malt_jax.tasks import Example
from tests.fixtures import write_tiny_config
from tests.parity_task import ParityTask

EXAMPLES = [Example(id=f"test-{i}", question=f"Question number {i}?", answer="even") for i in range(4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gr0")
    cfg = load_run_config(write_tiny_config(tmp / "cfg.yaml", tmp / "out", task="parity"))
    return cfg, load_model("random", cfg.model)


def _adapters(cfg):
    """Random per-role adapters far from zero (``b`` is zero at init), as if trained."""
    out = {}
    for i, r in enumerate(("G", "V", "R")):
        a = init_lora(cfg.model, cfg.lora, jax.random.key(i))
        out[r] = jax.tree.map(lambda w, i=i: w + 0.2 * jax.random.normal(jax.random.key(7 + i), w.shape), a)
    return out


def test_default_systems_hold_the_empty_critique_ablation():
    names = [s.name for s in default_systems(3, ablations=True)]
    assert names[-4:] == ["malt-G", "malt-GV", "malt-GR", "malt-GR0"]
    assert "malt-GR0" not in [s.name for s in default_systems(3)]
    gr0 = next(s for s in default_systems(3, ablations=True) if s.name == "malt-GR0")
    assert gr0 == System("malt-GR0", 3, 3, False, True, roles=("G", "R"), critique=False)
    assert EMPTY_CRITIQUE == {"GR0"} and ABLATIONS["GR0"] == ("G", "R")
    assert all(s.critique for s in default_systems(3, sft_chain=True, ablations=True) if s.name != "malt-GR0")
    row = {"pass_correct": [True, False, True], "pass_answers": ["a", "b", "a"], "vote_correct": True}
    rows = [{**row, "vote_answer": "a"}]
    assert set(system_results(gr0, rows)) == {"malt-GR0", "malt-GR0+MV@3"}
    with pytest.raises(ValueError, match="critique"):
        System("x", 1, 3, False, True, critique=False)


def test_an_empty_critique_gives_no_verdict_and_no_verifier_skill():
    task, ex = ParityTask(), EXAMPLES[0]
    # ParityTask's answer_key reads any text, the empty one too: the empty critique must not
    # count as stating an answer
    assert task.answer_key("", ex) is not None
    assert critique_verdict(task, "", "ab", ex) is None and critique_verdict(task, "  \n", "ab", ex) is None
    rows = [{"texts": {"G": ["ab", "abc"], "V": ["", ""], "R": ["ab", "ab"]}}]
    s = role_skills(task, EXAMPLES[:1], rows, critiques=False)
    assert s["verifier"]["n"] == 0 and np.isnan(s["verifier"]["balanced_accuracy"])
    assert s["generator"]["n"] == 2 and s["refiner"]["fixed"] == 1
    # counted as passes without a verdict otherwise
    assert role_skills(task, EXAMPLES[:1], rows)["verifier"]["right_no_verdict"] == 1


@pytest.mark.parametrize("framing", ["chat", "separate"])
def test_sample_trees_gives_the_refiner_its_prompt_with_an_empty_critique(tiny, framing):
    """sample_trees with an empty verifier level: V writes nothing (decoded ""), and each refiner
    pass equals generate() on the context built by hand: R's prefix + G's tokens + the codec's
    empty-critique separators (its prompt with the critique "", see test_codec)."""
    cfg, model = tiny
    task = ParityTask()
    codec = PromptCodec(model.tokenizer, task, framing)
    samp = SamplingConfig(temperature=1.0)
    spec = ExpansionSpec(
        n=2, m=1, l=1, depth=3, max_new=(6, 6, 6), sampling=samp, stop=codec.stop, mode="extend", empty_levels=(1,)
    )
    got = []
    sample_trees(model, codec, EXAMPLES[:2], spec, seed=5, batch_size=2, on_batch=lambda b, a: got.append(a))
    (arrays,) = got
    assert arrays["V_tokens"].shape == (2, 2, 1, 6)
    assert not arrays["V_lengths"].any() and (arrays["V_tokens"] == sampling.PAD_ID).all()
    texts = decode_tree(codec, arrays, empty=("V",))
    assert (texts["V"] == "").all() and texts["V"].shape == (2, 2, 1)
    assert arrays["R_lengths"].any()
    (_,), (s1, s2) = codec.empty_critique_seps
    for q, i in ((0, 1), (1, 0)):
        g = arrays["G_tokens"][q, i, : arrays["G_lengths"][q, i]].tolist()
        ctx = codec.prefixes(EXAMPLES[q].question)[1] + g + s1 + s2
        key = question_keys(5, [0, 1])[q]
        for fan, idx in zip((2, 1, 1), (i, 0, 0)):
            key = _child_keys(key[None], fan)[idx]
        x, lens = sampling.pad_batch([ctx])
        out = sampling.generate(
            model.params,
            x,
            lens,
            jax.random.fold_in(key, 0xA11CE)[None],
            cfg=model.cfg,
            sampling=samp,
            stop=codec.stop,
            max_new_tokens=6,
        )
        assert sampling.trim(out)[0] == arrays["R_tokens"][q, i, 0, 0, : arrays["R_lengths"][q, i, 0, 0]].tolist()


def test_run_eval_writes_the_empty_critique_system(tiny, tmp_path):
    """End to end in the paper's separate framing: malt-GR0's eval file holds G's texts of MALT's
    own chain (same G adapter, same keys), empty critiques, R's answers; it is compared with MALT
    only and has no verifier verdicts."""
    cfg, model = tiny
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, framing="separate"))
    task = ParityTask()
    systems = [s for s in default_systems(3, ablations=True) if s.name in ("malt", "malt-GR0")]
    ev = run_eval(cfg, model, task, EXAMPLES, tmp_path, _adapters(cfg), systems, progress=False, out=tmp_path)
    read = lambda n: [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    rows = {n: read(n) for n in ("malt", "malt-GR0")}
    gr0 = rows["malt-GR0"]
    assert len(gr0) == len(EXAMPLES) and all(len(r["pass_answers"]) == 3 for r in gr0)
    assert all(r["texts"]["V"] == ["", "", ""] for r in gr0)
    assert [r["texts"]["G"] for r in gr0] == [r["texts"]["G"] for r in rows["malt"]]
    assert any(v for r in rows["malt"] for v in r["texts"]["V"])  # MALT's V does write
    assert {"malt-GR0", "malt-GR0+MV@3"} <= set(ev["results"])
    assert "malt-GR0" not in ev["verifier"] and "malt" in ev["verifier"]
    assert ev["skills"]["malt-GR0"]["verifier"]["n"] == 0 and ev["skills"]["malt-GR0"]["generator"]["n"] == 12
    pairs = {(c["target"], c["baseline"]) for c in ev["comparisons"]}
    assert pairs == {("malt", "malt-GR0"), ("malt+MV@3", "malt-GR0+MV@3")}
