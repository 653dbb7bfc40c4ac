"""Text <-> token ids and chat formatting, built on the HF ``tokenizers`` library.

Two sources are supported:

* a GGUF file (``tokenizer.ggml.*`` metadata, byte-level BPE ``gpt2`` models only), e.g. the
  embedded SmolLM2-135M-Instruct;
* a Hugging Face ``tokenizer.json`` (plus optional ``tokenizer_config.json`` for the chat
  template and bos/eos/pad), as shipped with Llama 3 and most other HF checkpoints.

Chat templates are rendered with jinja2 in an immutable sandbox, with the same globals HF
``transformers`` provides (``bos_token``, ``eos_token``, ``raise_exception``, ``strftime_now``,
a ``tojson`` filter).

Only the chat template's own text may hold control tokens. Message contents (questions, model
outputs, role prompts) are encoded as plain text: a ``<|im_start|>`` typed in a question becomes
the ids of those characters, never the control token (:meth:`Tokenizer.encode_chat`,
:meth:`Tokenizer.chat_parts`, :meth:`Tokenizer.encode_literal`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

# Fallback when the source has no chat template: plain ChatML (no default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Tokens that end an assistant turn (or a document) in the common chat formats.
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>")

# GGUF ``tokenizer.ggml.pre`` -> split regex applied before the byte-level mapping, as in
# llama.cpp (llama-vocab.cpp). None means the GPT-2 regex of the ByteLevel pre-tokenizer.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_RE = {"llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "qwen2": _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


class TokenizerError(ValueError):
    """A tokenizer source is malformed or uses something this module does not support."""


def _field_value(field: Any) -> Any:
    """Value of a ``gguf.ReaderField``: ``contents()``, else decoded from the raw parts."""
    try:
        return field.contents()
    except (AttributeError, TypeError, ValueError):
        import gguf

        types = list(getattr(field, "types", []))
        is_str = bool(types) and types[-1] == gguf.GGUFValueType.STRING
        vals = [
            bytes(np.asarray(field.parts[i], dtype=np.uint8)).decode("utf-8")
            if is_str
            else np.asarray(field.parts[i]).tolist()[0]
            for i in field.data
        ]
        return vals if types and types[0] == gguf.GGUFValueType.ARRAY else vals[0]


def _special_str(value: Any) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_special(cfg: dict[str, Any], key: str, source: str) -> str | None:
    """``cfg[key]`` as a special-token string (absent or null: None); any other shape is an error."""
    value = cfg.get(key)
    if value is None:
        return None
    text = _special_str(value)
    if text is None:
        raise TokenizerError(
            f'{source}: field {key!r} must be a string or {{"content": string}}, got {json.dumps(value)[:80]}'
        )
    return text


def _config_template(template: Any, source: str) -> str | None:
    """The ``chat_template`` field: a string, or a list of ``{"name", "template"}`` (the
    ``default`` one, else the first)."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
        named = {t.get("name"): t["template"] for t in template}
        return named.get("default", next(iter(named.values()), None))
    raise TokenizerError(
        f'{source}: field \'chat_template\' must be a string or a list of {{"name", "template"}} objects, '
        f"got {type(template).__name__}"
    )


class Tokenizer:
    """Byte-level BPE tokenizer with chat-template support.

    Build one with :meth:`from_gguf`, :meth:`from_tokenizer_json` or :func:`load_tokenizer`.
    """

    def __init__(
        self,
        tok: HFTokenizer,
        *,
        bos: str | None,
        eos: str | None,
        pad: str | None = None,
        unk: str | None = None,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tok = tok
        self.source = source
        self.chat_template = chat_template
        self._special = {"bos_token": bos, "eos_token": eos, "pad_token": pad or eos, "unk_token": unk}
        for name, text in self._special.items():
            if text is not None and tok.token_to_id(text) is None:
                raise TokenizerError(f"{source}: {name} {text!r} is not in the vocabulary")
        if chat_template is not None:
            from jinja2.exceptions import TemplateSyntaxError

            try:
                self._compiled_template  # noqa: B018 - compile now: a broken template fails at load
            except TemplateSyntaxError as e:
                raise TokenizerError(f"{source}: chat_template line {e.lineno}: {e.message}") from None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, path_or_reader: str | Path | Any) -> Tokenizer:
        """Tokenizer from the ``tokenizer.*`` metadata of a GGUF file (or an open ``GGUFReader``)."""
        if hasattr(path_or_reader, "fields"):
            reader, source = path_or_reader, str(getattr(path_or_reader, "path", "<GGUF reader>"))
        else:
            path = Path(path_or_reader)
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            import gguf

            try:
                reader = gguf.GGUFReader(path)
            except Exception as e:  # noqa: BLE001 - gguf raises assorted errors on bad files
                raise TokenizerError(f"{path} is not a readable GGUF file: {e}") from e
            source = str(path)

        def get(key: str, default: Any = KeyError) -> Any:
            field = reader.fields.get(key)
            if field is None:
                if default is KeyError:
                    raise TokenizerError(f"{source}: GGUF metadata key {key!r} is missing")
                return default
            return _field_value(field)

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model={model!r} is not supported (only 'gpt2' byte-level BPE)"
            )
        pre = get("tokenizer.ggml.pre", "default")
        tokens: list[str] = list(get("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        types = list(get("tokenizer.ggml.token_type", [1] * len(tokens)))

        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = _gguf_pre_tokenizer(pre, source)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
        )
        tok.add_tokens(
            [
                AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types)
                if ty == TOKEN_TYPE_USER_DEFINED
            ]
        )

        def tok_str(key: str) -> str | None:
            idx = get(key, None)
            return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

        bos = tok_str("tokenizer.ggml.bos_token_id")
        if get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
            )
        return cls(
            tok,
            bos=bos,
            eos=tok_str("tokenizer.ggml.eos_token_id"),
            pad=tok_str("tokenizer.ggml.padding_token_id"),
            unk=tok_str("tokenizer.ggml.unknown_token_id"),
            chat_template=get("tokenizer.chat_template", None),
            source=source,
        )

    @classmethod
    def from_tokenizer_json(
        cls, path: str | Path, tokenizer_config: str | Path | dict[str, Any] | None = None
    ) -> Tokenizer:
        """Tokenizer from an HF ``tokenizer.json``.

        ``tokenizer_config`` (a path or an already-parsed dict) supplies ``chat_template`` and
        ``bos_token``/``eos_token``/``pad_token``; when None, a ``tokenizer_config.json`` next to
        ``path`` is used if present.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: cannot parse tokenizer file: {e}") from e
        if tokenizer_config is None and (path.parent / "tokenizer_config.json").is_file():
            tokenizer_config = path.parent / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        cfg_source = "tokenizer_config"
        if isinstance(tokenizer_config, dict):
            cfg = tokenizer_config
        elif tokenizer_config is not None:
            cfg_path = Path(tokenizer_config)
            cfg_source = str(cfg_path)
            if not cfg_path.is_file():
                raise FileNotFoundError(f"tokenizer_config.json not found: {cfg_path}")
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{cfg_path}: not UTF-8 text (byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
        template = _config_template(cfg.get("chat_template"), cfg_source)
        special = {k: _config_special(cfg, k, cfg_source) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = special["eos_token"]
        if eos is None:
            eos = next(
                (t for t in ("<|endoftext|>", "<|end_of_text|>", "</s>") if tok.token_to_id(t) is not None), None
            )
        try:
            return cls(
                tok,
                bos=special["bos_token"],
                eos=eos,
                pad=special["pad_token"],
                unk=special["unk_token"],
                chat_template=template,
                source=str(path),
            )
        except TokenizerError as e:
            raise TokenizerError(f"{e} (special tokens and chat template from {cfg_source})") from None

    # ---------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (e.g. for ``transformers.PreTrainedTokenizerFast``)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; KeyError if it is not in the vocabulary."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
        return idx

    def _id_of(self, name: str) -> int | None:
        text = self._special[name]
        return None if text is None else self.token_to_id(text)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (None if the model has none)."""
        return self._id_of("bos_token")

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id (None if unknown)."""
        return self._id_of("eos_token")

    @property
    def pad_id(self) -> int | None:
        """Padding id (falls back to eos)."""
        return self._id_of("pad_token")

    @cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation of an assistant turn: eos, then any of :data:`STOP_TOKENS` present."""
        ids = [] if self.eos_id is None else [self.eos_id]
        for text in STOP_TOKENS:
            idx = self._tok.token_to_id(text)
            if idx is not None and idx not in ids:
                ids.append(idx)
        return tuple(ids)

    # ---------------------------------------------------------------- text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of trusted ``text`` (e.g. a rendered template). Special tokens written in the
        text become single ids; BOS is prepended only if the model's post-processor asks for it
        and ``add_special_tokens``. For user or model text use :meth:`encode_literal`."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: special or added token strings in it
        (``<|im_start|>``, ``<|endoftext|>``) are tokenized like any other characters, and no BOS
        is added. Text without such strings gets the same ids as :meth:`encode`."""
        return self.encode_parts([(text, True)])

    @cached_property
    def _literal_backend(self) -> HFTokenizer:
        """A copy of the backend without added tokens: nothing in the text is matched as one."""
        spec = json.loads(self._tok.to_str())
        spec["added_tokens"] = []
        return HFTokenizer.from_str(json.dumps(spec))

    @cached_property
    def _added(self) -> dict[str, tuple[int, Any]]:
        """Added tokens (control and user-defined): content -> (id, ``AddedToken``)."""
        return {t.content: (i, t) for i, t in self._tok.get_added_tokens_decoder().items() if t.content}

    @cached_property
    def _marker_re(self) -> re.Pattern[str] | None:
        """Leftmost-longest matcher of the added tokens (None when there are none)."""
        if not self._added:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)))

    @cached_property
    def _control_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._added.values() if t.special)

    def _markers(self, text: str, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """``(token start, start, end, id)`` of the added tokens written in ``text[start:end]`` (template text),
        with the whitespace an ``lstrip``/``rstrip`` token absorbs, as ``tokenizers`` does."""
        if self._marker_re is None:
            return []
        out = []
        for m in self._marker_re.finditer(text, start, end):
            idx, added = self._added[m.group()]
            s, e = m.span()
            if added.single_word and (
                (s > 0 and (text[s - 1].isalnum() or text[s - 1] == "_"))
                or (e < len(text) and (text[e].isalnum() or text[e] == "_"))
            ):
                continue
            if added.lstrip:
                while s > 0 and text[s - 1].isspace():
                    s -= 1
            if added.rstrip:
                while e < len(text) and text[e].isspace():
                    e += 1
            out.append((m.start(), s, e, idx))
        return out

    def encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Token ids of the concatenated ``(text, literal)`` parts: the added tokens written in
        non-literal parts (the template's markers) become their ids; everything between them,
        literal text included, is tokenized as plain text, as one piece (so the ids equal those
        of :meth:`encode` on the whole text when the literal parts hold no token strings).
        Adds no BOS."""
        text = "".join(t for t, _ in parts)
        markers: list[tuple[int, int, int, int]] = []
        pos = 0
        for part, literal in parts:
            if not literal and part:
                markers += self._markers(text, pos, pos + len(part))
            pos += len(part)
        ids: list[int] = []
        last = 0
        for core, s, e, idx in markers:
            if core < last:  # inside the whitespace an rstrip token before it absorbed
                continue
            s = max(s, last)  # an lstrip token's whitespace stops at the previous marker
            if s > last:
                ids += self._plain(text[last:s])
            ids.append(idx)
            last = e
        if last < len(text):
            ids += self._plain(text[last:])
        return ids

    def _plain(self, text: str) -> list[int]:
        ids = self._literal_backend.encode(text, add_special_tokens=False).ids
        bad = [i for i in ids if i in self._control_ids]
        if bad:  # a vocabulary whose merges spell a control token: refuse rather than inject it
            raise TokenizerError(
                f"{self.source}: the text {text[:60]!r} tokenizes to the control token "
                f"{self._tok.id_to_token(bad[0])!r}; this vocabulary cannot encode it as plain text"
            )
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat
    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(
            x: Any,
            ensure_ascii: bool = False,
            indent: int | None = None,
            separators: Any = None,
            sort_keys: bool = False,
        ) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template or CHATML_TEMPLATE)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` (``{"role", "content"}`` dicts) with the model's chat template
        (ChatML if it has none). Extra keyword arguments are passed to the template."""
        special = {k: v for k, v in self._special.items() if v is not None}
        if messages and messages[0].get("role") == "system" and not self.supports_system_role:
            messages = _merge_system(messages)
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
        )

    @cached_property
    def supports_system_role(self) -> bool:
        """False when the chat template refuses a system message (Gemma); the system prompt is then
        written at the start of the first user turn, as such models are prompted."""
        from jinja2.exceptions import TemplateError

        special = {k: v for k, v in self._special.items() if v is not None}
        try:
            self._compiled_template.render(
                messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                add_generation_prompt=True,
                **special,
            )
        except TemplateError:
            return False
        return True

    def chat_parts(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[tuple[str, bool]]:
        """The rendered chat (:meth:`apply_chat_template`) as ``(text, literal)`` parts:
        ``literal`` for the text of a message's content, False for the template's own text.

        The template is rendered a second time with each content replaced by a placeholder that
        occurs nowhere in the chat; the contents are put back and the result must equal the real
        rendering (verbatim, or each content stripped as by a ``| trim`` template), so every
        part's origin is known by position. A template that rewrites contents otherwise is
        refused when a content holds a token string (otherwise its text is one template part).
        """
        if messages and messages[0].get("role") == "system" and not self.supports_system_role:
            messages = _merge_system(messages)
        rendered = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        contents = [m.get("content") for m in messages]
        tag = "\ue000"
        while tag in rendered:
            tag += "\ue000"
        held = [
            {**m, "content": f"{tag}{i}{tag}"} if isinstance(c, str) else m
            for i, (m, c) in enumerate(zip(messages, contents))
        ]
        template_only = self.apply_chat_template(held, add_generation_prompt, **kwargs)
        shape = re.split(f"{tag}(\\d+){tag}", template_only)
        texts: dict[int, str] = {i: c for i, c in enumerate(contents) if isinstance(c, str)}
        for fit in (lambda c: c, str.strip):
            parts = [(piece, False) if k % 2 == 0 else (fit(texts[int(piece)]), True) for k, piece in enumerate(shape)]
            if "".join(t for t, _ in parts) == rendered:
                return [(t, literal) for t, literal in parts if t]
        # the template rewrites the contents: safe as one piece only if they bring no token string
        found = [m.group() for m in self._marker_re.finditer(rendered)] if self._marker_re else []
        own = [m.group() for m in self._marker_re.finditer(template_only)] if self._marker_re else []
        hostile = [c for c in contents if isinstance(c, str) and self._marker_re and self._marker_re.search(c)]
        if found != own or hostile:
            extra = hostile[0] if hostile else next((t for t in found if found.count(t) > own.count(t)), "?")
            raise TokenizerError(
                f"{self.source}: the chat template rewrites message contents, so the token string in "
                f"{extra[:60]!r} cannot be kept as plain text"
            )
        return [(rendered, False)]

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat. Only the template's own text holds control tokens; the
        messages' contents are plain text (:meth:`chat_parts`). The template writes any BOS
        itself, so none is added."""
        return self.encode_parts(self.chat_parts(messages, add_generation_prompt, **kwargs))

    def save(self, out_dir: str | Path) -> None:
        """Writes ``tokenizer.json`` + ``tokenizer_config.json`` (chat template, special tokens),
        as Hugging Face ``transformers`` and :meth:`from_tokenizer_json` read them."""
        out = Path(out_dir)
        self._tok.save(str(out / "tokenizer.json"))
        special = {k: v for k, v in self._special.items() if v is not None}
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "chat_template": self.chat_template,
                    "add_bos_token": False,
                    "clean_up_tokenization_spaces": False,
                    **special,
                },
                indent=2,
            )
        )

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def _merge_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``[system, user, ...]`` -> ``[user(system + "\\n\\n" + user), ...]`` for templates without a system role."""
    system, rest = messages[0], list(messages[1:])
    if rest and rest[0].get("role") == "user":
        rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
    else:
        rest.insert(0, {"role": "user", "content": system["content"]})
    return rest


def _gguf_pre_tokenizer(pre: str, source: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer matching llama.cpp's handling of ``tokenizer.ggml.pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_RE:
        from tokenizers import Regex

        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_RE[pre]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    supported = sorted(_GPT2 + _DIGITS_THEN_GPT2 + tuple(_SPLIT_RE))
    raise TokenizerError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: {supported})")


def load_tokenizer(source: str | Path) -> Tokenizer:
    """Tokenizer from a ``.gguf`` file, a ``tokenizer.json`` file, or a directory holding a
    ``tokenizer.json`` (its ``tokenizer_config.json`` is used when present)."""
    path = Path(source)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_tokenizer_json(path / "tokenizer.json")
        raise FileNotFoundError(f"no tokenizer.json in directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer source not found: {path}")
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.suffix == ".json":
        return Tokenizer.from_tokenizer_json(path)
    raise TokenizerError(f"{path}: expected a .gguf file, a tokenizer.json, or a directory holding one")
