"""Role contexts with Hugging Face style tokenizers built here (no downloads): Llama-3.1 (BOS
post-processor, header tokens, <|eot_id|>), Qwen2.5 (ChatML, a default system prompt inserted by
the template, no BOS) and Gemma (<start_of_turn>/<end_of_turn>, BOS, no system role).

For each, in both framings: no BOS inside the turns, the end-of-turn token is a stop id, an SFT
completion ends with the template's end-of-turn token, the question prompt holds exactly as many
BOS as the template writes, and the token-level contexts decode to the rendered chats."""

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

from malt_jax.model.tokenizer import Tokenizer
from malt_jax.sampling.codec import PromptCodec
from malt_jax.stages.credit import node_output
from malt_jax.tasks import get_task
from malt_jax.tasks.prompts import role_messages, separate_messages

LLAMA31 = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n"
)
QWEN25 = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

STYLES = {
    # name: (special tokens, bos, eos, end-of-turn, template, BOS written by the template)
    "llama31": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|eot_id|>",
        LLAMA31,
        1,
    ),
    "qwen25": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>", QWEN25, 0),
    "gemma": (
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        GEMMA,
        1,
    ),
}

CORPUS = [
    "What is 56 ÷ 7? Give the answer as a line Final Answer: 8. The correct answer is 8 because 8 × 7 = 56.",
    "Problem: 37 - 9 = 28. Check the solution. Feedback: Verdict correct incorrect answer question number",
    "You are a helpful assistant. Read the problem and the proposed solution, then write the final answer.",
]


def _tokenizer(tmp_path, style) -> Tokenizer:
    specials, bos, eos, _, template, _ = STYLES[style]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        CORPUS * 4,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    if bos is not None:  # Llama-3 and Gemma tokenizers prepend BOS when asked for special tokens
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))]
        )
    path = tmp_path / style / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": bos, "eos_token": eos, "chat_template": template})
    )
    return Tokenizer.from_tokenizer_json(path)


Q = "What is 56 ÷ 7?"
G_TEXT = "56 ÷ 7 = 8\nFinal Answer: 8"
V_TEXT = " 8. 8 × 7 = 56."


@pytest.mark.parametrize("framing", ["chat", "separate"])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_role_contexts_with_hf_chat_templates(tmp_path, style, framing):
    _, bos, _, eot, _, n_bos = STYLES[style]
    tok = _tokenizer(tmp_path, style)
    if bos is not None:  # the tokenizer itself does add BOS by default: the codec must not ask for it
        assert tok.encode("x")[0] == tok.token_to_id(bos)
    bos_id = tok.bos_id
    task = get_task("synthetic", style="inverse")
    codec = PromptCodec(tok, task, framing)
    p = task.prompts
    count = lambda ids: 0 if bos_id is None else list(ids).count(bos_id)  # noqa: E731

    q = codec.question(Q)
    assert count(q) == n_bos and (n_bos == 0 or q[0] == bos_id)
    pv, pr = codec.prefixes(Q)
    assert count(pv) == n_bos and count(pr) == n_bos
    (sv,), (sr1, sr2) = codec.seps
    assert count(sv) == count(sr1) == count(sr2) == 0  # no BOS inside the turns

    eot_id = tok.token_to_id(eot)
    assert codec.end_of_turn == eot_id and eot_id in codec.stop.stop_ids
    # an SFT completion of a reply that stopped by itself ends with the end-of-turn token
    g = tok.encode(G_TEXT, add_special_tokens=False)
    v = tok.encode(V_TEXT, add_special_tokens=False)
    trees = {"G_tokens": np.asarray([[g]]), "G_lengths": np.asarray([[len(g)]]), "G_stopped": np.asarray([[True]])}
    done = node_output(trees, (0, 0), codec.end_of_turn)
    assert done[-1] == eot_id and done[:-1] == g
    trees["G_stopped"][:] = False
    assert node_output(trees, (0, 0), codec.end_of_turn) == g  # cut off: no end-of-turn

    # the token-level contexts are the rendered chats
    msgs = role_messages if framing == "chat" else separate_messages
    assert tok.decode(q) == tok.apply_chat_template(role_messages(p, "G", Q))
    want_v = tok.apply_chat_template(msgs(p, "V", Q, generator_out=G_TEXT)) + p.verifier_prefix
    want_r = (
        tok.apply_chat_template(msgs(p, "R", Q, generator_out=G_TEXT, verifier_out=p.verifier_prefix + V_TEXT))
        + p.refiner_prefix
    )
    assert tok.decode(pv + g + sv) == want_v
    assert tok.decode(pr + g + sr1 + v + sr2) == want_r
    # the role ablation G -> (no critique) -> R: R's prompt rendered with the critique ""
    (_,), (er1, er2) = codec.empty_critique_seps
    want_empty = tok.apply_chat_template(msgs(p, "R", Q, generator_out=G_TEXT, verifier_out="")) + p.refiner_prefix
    got = tok.decode(pr + g + er1 + er2)
    if got != want_empty:
        # a template that trims contents drops the whitespace before an empty critique at the end
        # of R's user turn; contexts are never re-rendered (R is trained on prefix + g + sep + v +
        # sep), so the empty critique's context keeps it, as a critique's would
        assert framing == "separate" and style in ("gemma", "llama31")
        assert re.sub(r"\s+" + re.escape(eot), eot, got) == want_empty
    if style == "gemma":  # no system role: the system prompt opens the first user turn
        assert not tok.supports_system_role and "<start_of_turn>system" not in want_v
        assert want_v.startswith(
            f"<bos><start_of_turn>user\n{(p.verifier_system if framing == 'separate' else p.system).strip()}"
        )
    elif style == "qwen25":
        assert tok.supports_system_role and "You are Qwen" not in want_v  # our system prompt replaces the default
        assert tok.bos_id is None and tok.encode("x") == tok.encode("x", add_special_tokens=False)


def test_template_default_system_prompt_without_ours(tmp_path):
    """A Qwen2.5-style template inserts its default system prompt when the chat has none."""
    tok = _tokenizer(tmp_path, "qwen25")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("<|im_start|>assistant\n")
