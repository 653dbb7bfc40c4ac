"""Role prompts for the Generator -> Verifier -> Refiner chain, as ONE growing chat.

The sampler shares KV-cache prefixes, so the three roles are successive turns of a single
conversation::

    G: [system, user(generator with {question})]
    V: G + [assistant(generator_out), user(verifier)]
    R: V + [assistant(verifier_out), user(refiner)]

Only ``{question}`` is substituted (by plain string replacement, so LaTeX braces in
questions and other literal braces in templates are safe). Defaults live in
``malt_jax/tasks/prompts/<task>.yaml``; any of them can be overridden from a YAML file or a
mapping via ``RolePrompts.from_mapping`` / ``RolePrompts.from_yaml``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = "{question}"
ROLES = ("generator", "verifier", "refiner")
_ROLE_ALIASES = {"g": "generator", "v": "verifier", "r": "refiner"}


@dataclasses.dataclass(frozen=True)
class RolePrompts:
    """System prompt plus one user-turn template per role.

    ``generator`` must contain ``{question}``; ``verifier`` and ``refiner`` have no
    placeholders (they refer to the answer/critique above them in the conversation).
    """

    system: str
    generator: str
    verifier: str
    refiner: str

    def __post_init__(self) -> None:
        for key in ("system", *ROLES):
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"RolePrompts.{key} must be a string")
        if PLACEHOLDER not in self.generator:
            raise ValueError(f"RolePrompts.generator must contain {PLACEHOLDER}")
        for key in ("system", "verifier", "refiner"):
            if PLACEHOLDER in getattr(self, key):
                raise ValueError(f"RolePrompts.{key} must not contain {PLACEHOLDER}")

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
        missing = [k for k in fields if k not in data]
        if missing:
            raise ValueError(f"missing role prompt keys {missing}; required: {fields}")
        return cls(**{k: data[k] for k in fields})

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
        role = canonical_role(role)
        if role == "generator":
            return self.generator.replace(PLACEHOLDER, question)
        return getattr(self, role)


def canonical_role(role: str) -> str:
    """``"generator"``/``"verifier"``/``"refiner"`` (also accepts ``G``/``V``/``R``)."""
    name = _ROLE_ALIASES.get(role.lower(), role.lower())
    if name not in ROLES:
        raise ValueError(f"unknown role {role!r}; valid roles: {list(ROLES)}")
    return name


def role_messages(
    prompts: RolePrompts,
    role: str,
    question: str,
    generator_out: str | None = None,
    verifier_out: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages that prompt ``role``; each role's list extends the previous role's."""
    role = canonical_role(role)
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
    raise TypeError(
        f"prompts must be RolePrompts, a mapping or a YAML path, got {type(override).__name__}"
    )
