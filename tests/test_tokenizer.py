"""Tokenizer tests: GGUF SmolLM2 vs an independent pure-Python byte-level BPE, chat templates,
tokenizer.json loading and error messages."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import regex

from malt_jax.model.files import smollm2_gguf_path
from malt_jax.model.tokenizer import Tokenizer, TokenizerError, _field_value, load_tokenizer

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 + 678 = ?",
    "What is 7*8? It's 56.",
    "3.14159 and -42, 1e-9, 0x1F",
    "café 東京 🙂",
    "naïve façade — “quoted” ‘text’ …",
    "Привет, мир! Ελληνικά. العربية",
    "٣٤٥ ½ Ⅻ ²",
    "    leading spaces",
    "trailing spaces   ",
    "a   b\t\tc",
    "line one\nline two\n\nline four\r\n",
    "\n\n\n",
    " ",
    "",
    "I'm sure you've seen they'll do it, we'd go, he's here.",
    "I'M SHOUTING'S",
    "def f(x):\n    return x ** 2  # square",
    "{\"key\": [1, 2, 3], 'b': None}",
    "https://example.com/path?q=1&r=2#frag",
    "email@example.org, @user #hashtag $100 50% ~tilde~",
    "!!!???...,,,;;;",
    "<html><body>not special</body></html>",
    "<|im_start nope|> almost special",
    "Mixed123abc456def",
    "  \n  \t ",
    "emoji 👩‍👩‍👧‍👦 flags 🇫🇷 combining é",
    "zero\u200bwidth and nbsp\u00a0here",
    "The answer is: 1 2 3 4 5 6 7 8 9 10.",
]


# ------------------------------------------------------------------ independent reference BPE
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


GPT2_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
DIGIT_RE = regex.compile(r"\p{N}")


class ReferenceBPE:
    """Textbook GPT-2 BPE with llama.cpp's 'smollm' pre-tokenization (digits isolated first)."""

    def __init__(self, tokens: list[str], merges: list[str]) -> None:
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.b2u = bytes_to_unicode()

    def pieces(self, text: str) -> list[str]:
        out, pos = [], 0
        for m in DIGIT_RE.finditer(text):
            out += GPT2_RE.findall(text[pos : m.start()]) + [m.group()]
            pos = m.end()
        return out + GPT2_RE.findall(text[pos:])

    def bpe(self, word: str) -> list[str]:
        syms = list(word)
        while len(syms) > 1:
            pairs = {(a, b) for a, b in zip(syms, syms[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    merged.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        return syms

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pieces(text):
            mapped = "".join(self.b2u[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[s] for s in self.bpe(mapped)]
        return ids


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tok(reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def ref(reader: gguf.GGUFReader) -> ReferenceBPE:
    return ReferenceBPE(
        reader.fields["tokenizer.ggml.tokens"].contents(), reader.fields["tokenizer.ggml.merges"].contents()
    )


# ------------------------------------------------------------------ GGUF SmolLM2
def test_matches_reference_bpe(tok: Tokenizer, ref: ReferenceBPE) -> None:
    mismatches = {t: (tok.encode(t), ref.encode(t)) for t in TEXTS if tok.encode(t) != ref.encode(t)}
    assert not mismatches
    assert tok.encode("12345") == [ref.vocab[d] for d in "12345"]  # digits are split individually


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_single_ids(tok: Tokenizer, reader: gguf.GGUFReader, ref: ReferenceBPE) -> None:
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    im_start, im_end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert tok.encode("<|im_start|>") == [im_start]
    assert tok.token_to_id("<|im_end|>") == im_end
    ids = tok.encode("<|im_start|>user\nHi there<|im_end|>")
    assert ids == [im_start, *ref.encode("user\nHi there"), im_end]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi there"
    assert tok.decode(ids) == "<|im_start|>user\nHi there<|im_end|>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.stop_ids[0] == tok.eos_id and im_end in tok.stop_ids
    assert tok.encode("Hello")[0] != tok.bos_id  # add_bos_token is False for SmolLM2
    with pytest.raises(KeyError, match="<not-a-token>"):
        tok.token_to_id("<not-a-token>")


def test_chat_template_smollm2(tok: Tokenizer) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected[: -len("<|im_start|>assistant\n")]
    own_system = [{"role": "system", "content": "Be terse."}, *msgs]
    assert tok.apply_chat_template(own_system).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user")
    assert tok.encode_chat(msgs) == tok.encode(expected)
    assert tok.encode_chat(msgs)[:1] == [tok.token_to_id("<|im_start|>")]


# ------------------------------------------------------------------ tokenizer.json
def _tiny_tokenizer_json() -> dict:
    """A hand-written byte-level BPE that knows 'hello', ' world' and '!', with BOS added by its post-processor."""
    specials = ["<unk>", "<s>", "</s>"]
    chars = ["h", "e", "l", "o", "Ġ", "w", "r", "d", "!"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    vocab = {t: i for i, t in enumerate(specials + chars + [m.replace(" ", "") for m in merges])}
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, t in enumerate(specials)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def test_tiny_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json()))
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'user' %}"
        "{{ raise_exception('only user turns, got ' + m['role']) }}{% endif %}"
        "{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path)  # picks up tokenizer_config.json next to tokenizer.json
    hello, world, bang = (tok.token_to_id(t) for t in ("hello", "Ġworld", "!"))
    assert tok.encode("hello world!") == [1, hello, world, bang]
    assert tok.encode("hello world!", add_special_tokens=False) == [hello, world, bang]
    assert tok.encode("hello</s>hello", add_special_tokens=False) == [hello, 2, hello]
    assert tok.decode([1, hello, world, bang, 2]) == "<s>hello world!</s>"
    assert tok.decode([1, hello, world, bang, 2], skip_special_tokens=True) == "hello world!"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 2, (2,))
    msgs = [{"role": "user", "content": "hello world!"}]
    assert tok.apply_chat_template(msgs) == "<s>hello world!</s>"
    assert tok.encode_chat(msgs) == [1, hello, world, bang, 2]  # no second BOS from the post-processor
    with pytest.raises(Exception, match="only user turns, got assistant"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    # a template that refuses the system role gets the system prompt at the start of the user turn
    assert not tok.supports_system_role
    assert tok.apply_chat_template([{"role": "system", "content": "x"}, msgs[0]]) == "<s>x\n\nhello world!</s>"
    # Without a config: no chat template -> ChatML fallback; no bos; eos guessed from the vocab ('</s>').
    bare = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", tokenizer_config={})
    assert bare.apply_chat_template(msgs) == "<|im_start|>user\nhello world!<|im_end|>\n<|im_start|>assistant\n"
    assert (bare.bos_id, bare.eos_id, bare.stop_ids) == (None, 2, (2,))


def test_gguf_tokenizer_serialized_to_json(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.backend.to_str())
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": tok.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    again = load_tokenizer(path)
    for text in TEXTS + ["<|im_start|>user\n12 apples<|im_end|>"]:
        assert again.encode(text) == tok.encode(text), text
    msgs = [{"role": "user", "content": "Hi"}]
    assert again.encode_chat(msgs) == tok.encode_chat(msgs)
    assert (again.bos_id, again.eos_id, again.stop_ids) == (tok.bos_id, tok.eos_id, tok.stop_ids)


# ------------------------------------------------------------------ errors
def _fake_reader(**fields: object) -> SimpleNamespace:
    return SimpleNamespace(fields={k: SimpleNamespace(contents=lambda v=v: v) for k, v in fields.items()})


def test_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    for load in (Tokenizer.from_gguf, Tokenizer.from_tokenizer_json, load_tokenizer):
        with pytest.raises(FileNotFoundError, match="nope.gguf"):
            load(missing)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.model": "gpt2"}))
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(_fake_reader())
    with pytest.raises(TokenizerError, match="'llama' is not supported"):
        Tokenizer.from_gguf(_fake_reader(**{"tokenizer.ggml.model": "llama"}))
    tiny = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(TokenizerError, match="'klingon' is not supported"):
        Tokenizer.from_gguf(_fake_reader(**tiny, **{"tokenizer.ggml.pre": "klingon"}))
    assert Tokenizer.from_gguf(_fake_reader(**tiny)).encode("ab") == [2]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerError, match="bad.gguf"):
        Tokenizer.from_gguf(bad)


def test_field_value_fallback_from_raw_parts() -> None:
    """Old gguf versions have no ReaderField.contents(): values are decoded from the raw parts."""
    strings = SimpleNamespace(
        types=[gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING],
        data=[1, 3],
        parts=[None, np.frombuffer(b"Hi", np.uint8), None, np.frombuffer("é".encode(), np.uint8)],
    )
    scalar = SimpleNamespace(types=[gguf.GGUFValueType.UINT32], data=[0], parts=[np.array([7], np.uint32)])
    assert _field_value(strings) == ["Hi", "é"]
    assert _field_value(scalar) == 7


def test_qwen2_pre_tokenizer_splits_single_digits() -> None:
    """GGUF ``tokenizer.ggml.pre = qwen2``: Qwen's split regex (digits one by one, unlike Llama 3's
    groups of up to three), then the byte-level mapping."""
    from malt_jax.model.tokenizer import _gguf_pre_tokenizer

    qwen = [p for p, _ in _gguf_pre_tokenizer("qwen2", "x.gguf").pre_tokenize_str("Pay 12345 now's")]
    llama3 = [p for p, _ in _gguf_pre_tokenizer("llama-bpe", "x.gguf").pre_tokenize_str("Pay 12345 now's")]
    assert qwen == ["Pay", "Ġ", "1", "2", "3", "4", "5", "Ġnow", "'s"]
    assert llama3 == ["Pay", "Ġ", "123", "45", "Ġnow", "'s"]


@pytest.mark.parametrize(
    "content,match",
    [
        (b'{"eos_token": "</s>",\n "chat_template": }', r"tokenizer_config.json:2: invalid JSON"),
        (b'{"eos_token": "caf\xe9"}', "tokenizer_config.json: not UTF-8 text"),
        (b'["not", "an", "object"]', "tokenizer_config.json: expected a JSON object, got list"),
        (b'{"chat_template": 42}', "tokenizer_config.json: field 'chat_template' must be a string"),
        (b'{"chat_template": [{"name": "default"}]}', "tokenizer_config.json: field 'chat_template'"),
        (b'{"eos_token": ["</s>"]}', "tokenizer_config.json: field 'eos_token' must be a string"),
        (b'{"eos_token": "<nope>"}', r"eos_token '<nope>' is not in the vocabulary \(.*tokenizer_config.json\)"),
        (b'{"chat_template": "{% for m in messages %}{{ m }"}', "chat_template line 1"),
    ],
)
def test_malformed_tokenizer_config_names_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps(_tiny_tokenizer_json()))
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=match) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
