"""Small tokenizers for models pretrained from scratch (``malt-jax pretrain``).

A model of a few million parameters cannot afford SmolLM2's 49,152-token vocabulary: its LM head
(tied to the embedding) would hold most of the parameters and cost most of a training step's
FLOPs (``bench/tokenizer_cost.py`` measures it). :func:`train_tokenizer` trains a real Hugging
Face ``tokenizers`` BPE tokenizer of a few hundred tokens on corpus text instead, in one of two
kinds:

* ``"bytelevel"``: byte-level BPE (GPT-2 / SmolLM2 style): 256 byte tokens + merges, so any text
  round-trips; at least 259 tokens.
* ``"char"``: BPE over the printable ASCII characters plus newline and tab (97), with an
  ``<|unk|>`` token for anything else; at least 101 tokens (then it is a character tokenizer).

Both split digits one by one (``pre_tokenizers.Digits(individual_digits=True)``, as SmolLM2 does),
so numbers are spelled the same way everywhere, and both carry the ChatML special tokens
``<|endoftext|>`` (id 0), ``<|im_start|>`` (1), ``<|im_end|>`` (2) and a ChatML chat template, the
template family of SmolLM2 (its template without SmolLM2's default system prompt). The files
written (``tokenizer.json`` + ``tokenizer_config.json``) are what
:func:`malt_jax.model.tokenizer.load_tokenizer` and Hugging Face ``transformers`` read.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from malt_jax.model.tokenizer import Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "KINDS",
    "CHAR_ALPHABET",
    "min_vocab_size",
    "train_tokenizer",
]

EOT, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)
KINDS = ("bytelevel", "char")
# printable ASCII, newline and tab (no \r, \v, \f)
CHAR_ALPHABET = tuple(c for c in string.printable if c not in "\r\x0b\x0c")

# ChatML as SmolLM2-135M-Instruct writes it, without its default system prompt ("You are a
# helpful AI assistant named SmolLM, trained by Hugging Face"), which would not be true here.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def min_vocab_size(kind: str) -> int:
    """The smallest vocabulary of a ``kind``: its base alphabet plus the special tokens."""
    if kind == "bytelevel":
        return len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if kind == "char":
        return len(CHAR_ALPHABET) + len(SPECIAL_TOKENS) + 1
    raise ValueError(f"tokenizer.kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def _backend(kind: str) -> tuple[HFTokenizer, list[str]]:
    if kind == "bytelevel":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        return tok, list(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Split(" ", "merged_with_next")]
    )
    tok.decoder = decoders.Fuse()  # tokens are plain text pieces: concatenate them
    return tok, list(CHAR_ALPHABET)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    kind: Literal["bytelevel", "char"] = "bytelevel",
) -> Tokenizer:
    """Trains a BPE tokenizer of exactly ``vocab_size`` tokens (special tokens included) on
    ``texts`` and, with ``out_dir``, writes ``tokenizer.json`` + ``tokenizer_config.json`` there.
    When the texts hold too few merges (merges need two occurrences; digits never merge), the
    vocabulary is filled with unused ``<|reserved_N|>`` special tokens, so the model's
    ``vocab_size`` is always the tokenizer's.

    Raises ValueError (one line, naming ``tokenizer.vocab_size``) when ``vocab_size`` is below the
    kind's minimum."""
    lo = min_vocab_size(kind)
    if vocab_size < lo:
        raise ValueError(f"tokenizer.vocab_size: a {kind} tokenizer needs at least {lo} tokens, got {vocab_size}")
    tok, alphabet = _backend(kind)
    special = list(SPECIAL_TOKENS) + ([UNK] if kind == "char" else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        min_frequency=2,
        show_progress=False,
    )
    # the special tokens are whole tokens already: their strings split the texts and never
    # enter the merges (else "<|", "endoftext"... would take vocabulary slots)
    split = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
    tok.train_from_iterator([piece for text in texts for piece in split.split(text) if piece], trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:  # the texts ran out of merges: reserved tokens fill the vocabulary
        tok.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True, normalized=False) for i in range(vocab_size - got)]
        )
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise ValueError(f"tokenizer.vocab_size: training gave {got} tokens instead of {vocab_size}")
    out = Tokenizer(
        tok,
        bos=IM_START,
        eos=IM_END,
        pad=IM_END,
        unk=UNK if kind == "char" else EOT,
        chat_template=CHAT_TEMPLATE,
        source=f"<trained {kind} BPE, {vocab_size} tokens>",
    )
    if out_dir is not None:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        out.save(path)
    return out
