"""Role prompts for the Generator -> Verifier -> Refiner chain, in two framings.

**chat** (:func:`role_messages`): the three roles are successive turns of one conversation::

    G: [system, user(generator with {question})]
    V: G + [assistant(generator_out), user(verifier)]
    R: V + [assistant(verifier_out), user(refiner)]

**separate** (:func:`separate_messages`, the paper's framing, appendix A.4): every role has its
own system prompt and one user turn that quotes what it needs::

    G: [system, user(generator with {question})]
    V: [verifier_system, user(verifier_separate with {question}, {answer})]
    R: [refiner_system, user(refiner_separate with {question}, {answer}, {critique})]

``verifier_prefix`` / ``refiner_prefix`` (optional) start the role's reply in both framings
(e.g. ``"Verdict:"``): they are part of the context, and a role's text is read as prefix +
output. Placeholders are substituted by plain string replacement (LaTeX braces in questions
and other literal braces in templates are safe). Defaults live in
``malt_jax/tasks/prompts/<task>.yaml``; any of them can be overridden from a YAML file or a
mapping via ``RolePrompts.from_mapping`` / ``RolePrompts.from_yaml``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from malt_jax.roles import role_name

PLACEHOLDER = "{question}"
ANSWER = "{answer}"
CRITIQUE = "{critique}"
FRAMINGS = ("chat", "separate")


@dataclasses.dataclass(frozen=True)
class RolePrompts:
    """System prompt plus user-turn templates per role and framing.

    ``generator`` must contain ``{question}``; the chat turns ``verifier`` and ``refiner`` have
    no placeholders (they refer to the answer/critique above them in the conversation). The
    separate framing's ``verifier_separate`` holds ``{question}`` then ``{answer}``, and
    ``refiner_separate`` ``{question}``, ``{answer}`` then ``{critique}``, each exactly once and in
    that order (so every context is a per-question prefix followed by the earlier outputs).
    Empty ``verifier_system`` / ``refiner_system`` mean ``system``.
    """

    system: str
    generator: str
    verifier: str
    refiner: str
    verifier_system: str = ""
    refiner_system: str = ""
    verifier_separate: str = ""
    refiner_separate: str = ""
    verifier_prefix: str = ""
    refiner_prefix: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), str):
                raise TypeError(f"RolePrompts.{f.name} must be a string")
        if PLACEHOLDER not in self.generator:
            raise ValueError(f"RolePrompts.generator must contain {PLACEHOLDER}")
        for key in (
            "system",
            "verifier",
            "refiner",
            "verifier_system",
            "refiner_system",
            "verifier_prefix",
            "refiner_prefix",
        ):
            for ph in (PLACEHOLDER, ANSWER, CRITIQUE):
                if ph in getattr(self, key):
                    raise ValueError(f"RolePrompts.{key} must not contain {ph}")
        for key, order in (
            ("verifier_separate", (PLACEHOLDER, ANSWER)),
            ("refiner_separate", (PLACEHOLDER, ANSWER, CRITIQUE)),
        ):
            text = getattr(self, key)
            if not text:
                continue
            where = [text.find(ph) for ph in order]
            if any(text.count(ph) != 1 for ph in order) or where != sorted(where):
                raise ValueError(f"RolePrompts.{key} must contain {', '.join(order)} once each, in that order")
            if key == "verifier_separate" and CRITIQUE in text:
                raise ValueError(f"RolePrompts.{key} must not contain {CRITIQUE}")

    @property
    def has_separate(self) -> bool:
        """Whether the separate framing's templates are given."""
        return bool(self.verifier_separate and self.refiner_separate)

    def prefix(self, role: str) -> str:
        """The text that starts ``role``'s reply ('' for the generator)."""
        role = role_name(role)
        return {"generator": "", "verifier": self.verifier_prefix, "refiner": self.refiner_prefix}[role]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base: RolePrompts | None = None) -> RolePrompts:
        """Build from a mapping; with ``base``, missing keys are taken from it.

        Raises ``ValueError`` naming unknown keys, and (without ``base``) missing keys.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"role prompts must be a mapping, got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown role prompt keys {unknown}; valid keys: {fields}")
        if base is not None:
            return dataclasses.replace(base, **dict(data))
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"missing role prompt keys {missing}; required: {required}")
        return cls(**{k: data[k] for k in fields if k in data})

    @classmethod
    def from_yaml(cls, path: str | Path, base: RolePrompts | None = None) -> RolePrompts:
        """Build from a YAML file holding a mapping with the four keys."""
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        try:
            return cls.from_mapping(data or {}, base=base)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def user_turn(self, role: str, question: str) -> str:
        """The user message that opens ``role``'s turn."""
        role = role_name(role)
        if role == "generator":
            return self.generator.replace(PLACEHOLDER, question)
        return getattr(self, role)


def role_messages(
    prompts: RolePrompts,
    role: str,
    question: str,
    generator_out: str | None = None,
    verifier_out: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages that prompt ``role``; each role's list extends the previous role's."""
    role = role_name(role)
    msgs = [
        {"role": "system", "content": prompts.system},
        {"role": "user", "content": prompts.user_turn("generator", question)},
    ]
    if role == "generator":
        return msgs
    if generator_out is None:
        raise ValueError(f"role {role!r} needs generator_out")
    msgs += [
        {"role": "assistant", "content": generator_out},
        {"role": "user", "content": prompts.verifier},
    ]
    if role == "verifier":
        return msgs
    if verifier_out is None:
        raise ValueError("role 'refiner' needs verifier_out")
    msgs += [
        {"role": "assistant", "content": verifier_out},
        {"role": "user", "content": prompts.refiner},
    ]
    return msgs


def separate_messages(
    prompts: RolePrompts,
    role: str,
    question: str,
    generator_out: str | None = None,
    verifier_out: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages that prompt ``role`` in the separate framing (its own system prompt and one
    user turn quoting the question and the earlier outputs, which should include their prefixes)."""
    role = role_name(role)
    if role == "generator":
        return role_messages(prompts, role, question)
    if not prompts.has_separate:
        raise ValueError("the separate framing needs the role prompts verifier_separate and refiner_separate")
    if generator_out is None:
        raise ValueError(f"role {role!r} needs generator_out")
    if role == "verifier":
        system, text = prompts.verifier_system or prompts.system, prompts.verifier_separate
    else:
        if verifier_out is None:
            raise ValueError("role 'refiner' needs verifier_out")
        system, text = prompts.refiner_system or prompts.system, prompts.refiner_separate
    values = {PLACEHOLDER: question, ANSWER: generator_out, CRITIQUE: verifier_out or ""}
    # one pass: placeholder-like text inside the question or the outputs stays literal
    text = re.sub("|".join(re.escape(k) for k in values), lambda m: values[m.group(0)], text)
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def default_prompts(task_name: str) -> RolePrompts:
    """The packaged default prompts ``malt_jax/tasks/prompts/<task_name>.yaml``."""
    res = importlib.resources.files("malt_jax.tasks").joinpath("prompts", f"{task_name}.yaml")
    data = yaml.safe_load(res.read_text(encoding="utf-8"))
    return RolePrompts.from_mapping(data)


def resolve_prompts(task_name: str, override: Any = None) -> RolePrompts:
    """Task defaults, optionally overridden by a RolePrompts, a (partial) mapping or a YAML path."""
    base = default_prompts(task_name)
    if override is None:
        return base
    if isinstance(override, RolePrompts):
        return override
    if isinstance(override, Mapping):
        return RolePrompts.from_mapping(override, base=base)
    if isinstance(override, (str, Path)):
        return RolePrompts.from_yaml(override, base=base)
    raise TypeError(f"prompts must be RolePrompts, a mapping or a YAML path, got {type(override).__name__}")
