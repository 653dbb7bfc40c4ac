"""PromptCodec: the token-level V and R contexts of both framings equal the rendered chats."""

import dataclasses

import pytest

from malt_jax.model.files import smollm2_gguf_path
from malt_jax.model.tokenizer import load_tokenizer
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages.credit import node_context
from malt_jax.tasks import get_task
from malt_jax.tasks.prompts import RolePrompts, role_messages, separate_messages


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(smollm2_gguf_path())


Q = "What is 56 ÷ 7?"
G_TEXT = "56 ÷ 7 = 8\nFinal Answer: 8"
V_TEXT = " 8. 8 × 7 = 56."


@pytest.mark.parametrize("framing", ["chat", "separate"])
def test_contexts_equal_the_rendered_role_prompts(tok, framing):
    task = get_task("synthetic", style="inverse")
    codec = PromptCodec(tok, task, framing)
    p = task.prompts
    g, v = tok.encode(G_TEXT, add_special_tokens=False), tok.encode(V_TEXT, add_special_tokens=False)
    pv, pr = codec.prefixes(Q)
    (sv,), (sr1, sr2) = codec.seps
    msgs = role_messages if framing == "chat" else separate_messages
    want_v = tok.apply_chat_template(msgs(p, "V", Q, generator_out=G_TEXT)) + p.verifier_prefix
    want_r = (
        tok.apply_chat_template(msgs(p, "R", Q, generator_out=G_TEXT, verifier_out=p.verifier_prefix + V_TEXT))
        + p.refiner_prefix
    )
    assert tok.decode(pv + g + sv) == want_v
    assert tok.decode(pr + g + sr1 + v + sr2) == want_r
    if framing == "separate":  # each role its own system prompt, the question quoted in its turn
        assert p.verifier_system in want_v and p.system not in want_v and Q in want_v
        assert want_r.count(Q) == 1 and f"Feedback:\n{p.verifier_prefix}{V_TEXT}" in want_r
    else:
        assert tok.decode(pv) == tok.decode(codec.question(Q)) and pr == pv
    assert codec.end_of_turn == tok.token_to_id("<|im_end|>")
    assert codec.text("R", " 8") == "Final Answer: 8" and codec.text("G", "x") == "x"


@pytest.mark.parametrize("framing", ["chat", "separate"])
def test_empty_critique_contexts_are_the_refiner_prompt_with_an_empty_critique(tok, framing):
    """The role ablation G -> (no critique) -> R: R's context from ``empty_critique_seps`` is the
    refiner prompt rendered with the critique "" (not even the verifier's reply prefix), token
    for token as the codec builds a prompt; V's own separator does not change."""
    task = get_task("synthetic", style="inverse")
    codec = PromptCodec(tok, task, framing)
    p = task.prompts
    assert p.verifier_prefix  # the prefix R must not read
    g = tok.encode(G_TEXT, add_special_tokens=False)
    _, pr = codec.prefixes(Q)
    (sv,), (sr1, sr2) = codec.empty_critique_seps
    assert sv == codec.seps[0][0] and sr2 == codec.seps[1][1] and sr1 != codec.seps[1][0]
    msgs = role_messages if framing == "chat" else separate_messages
    r_msgs = msgs(p, "R", Q, generator_out=G_TEXT, verifier_out="")
    assert tok.decode(pr + g + sr1 + sr2) == tok.apply_chat_template(r_msgs) + p.refiner_prefix
    assert pr + g + sr1 + sr2 == tok.encode_parts([*tok.chat_parts(r_msgs), (p.refiner_prefix, True)])
    # with a critique the same pieces give the usual context
    v = tok.encode(V_TEXT, add_special_tokens=False)
    full = msgs(p, "R", Q, generator_out=G_TEXT, verifier_out=p.verifier_prefix + V_TEXT)
    (_,), (s1, s2) = codec.seps
    assert pr + g + s1 + v + s2 == tok.encode_parts([*tok.chat_parts(full), (p.refiner_prefix, True)])


def test_node_context_rebuilds_the_sampled_contexts(tok):
    """node_context (training prompts) from stored prefix arrays + outputs + separators."""
    import numpy as np

    task = get_task("synthetic", style="inverse")
    codec = PromptCodec(tok, task, "separate")
    g, v = tok.encode(G_TEXT, add_special_tokens=False), tok.encode(V_TEXT, add_special_tokens=False)
    pv, pr = codec.prefixes(Q)
    pad = lambda x, n: np.asarray([x + [0] * (n - len(x))])  # noqa: E731
    q = codec.question(Q)
    trees = {
        "q_tokens": pad(q, 200),
        "q_lens": np.asarray([len(q)]),
        "V_prefix": pad(pv, 200),
        "V_prefix_lens": np.asarray([len(pv)]),
        "R_prefix": pad(pr, 200),
        "R_prefix_lens": np.asarray([len(pr)]),
        "G_tokens": pad(g, 40)[:, None],
        "G_lengths": np.asarray([[len(g)]]),
        "V_tokens": pad(v, 40)[:, None, None],
        "V_lengths": np.asarray([[[len(v)]]]),
    }
    assert node_context(trees, codec.seps, (0, 0)) == q
    assert node_context(trees, codec.seps, (0, 0, 0)) == pv + g + codec.seps[0][0]
    assert node_context(trees, codec.seps, (0, 0, 0, 0)) == pr + g + codec.seps[1][0] + v + codec.seps[1][1]


def test_separate_framing_needs_its_templates(tok):
    task = get_task("synthetic")
    plain = dataclasses.replace(task.prompts, verifier_separate="", refiner_separate="")
    task.prompts = plain
    with pytest.raises(ValueError, match="verifier_separate"):
        PromptCodec(tok, task, "separate")
    with pytest.raises(ValueError, match="framing"):
        PromptCodec(tok, task, "sideways")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"verifier_separate": "{answer} then {question}"}, "in that order"),
        ({"refiner_separate": "{question} {answer}"}, "once each"),
        ({"verifier_separate": "{question} {answer} {critique}"}, "must not contain"),
        ({"verifier_prefix": "Verdict on {answer}:"}, "must not contain"),
    ],
)
def test_role_prompt_templates_are_checked(bad, match):
    base = get_task("synthetic").prompts
    with pytest.raises(ValueError, match=match):
        RolePrompts.from_mapping(bad, base=base)


def test_placeholders_inside_outputs_stay_literal():
    p = get_task("synthetic").prompts
    msgs = separate_messages(p, "R", "Q {answer}?", generator_out="says {critique}", verifier_out="V")
    text = msgs[1]["content"]
    assert "Q {answer}?" in text and "says {critique}" in text and "Feedback:\nV" in text
