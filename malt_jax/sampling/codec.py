"""Prompts as tokens: the G -> V -> R contexts of a task, in the chat or the separate framing."""

from __future__ import annotations

import dataclasses
import functools

from malt_jax.model.tokenizer import Tokenizer
from malt_jax.sampling.decode import StopCriteria
from malt_jax.tasks import Task, role_messages

__all__ = ["PromptCodec"]

_G, _V = "\x00GEN\x00", "\x00VER\x00"  # sentinels for the earlier outputs while rendering


@dataclasses.dataclass(frozen=True)
class PromptCodec:
    """Token-level rendering of the G -> V -> R contexts of a task, in one of two framings.

    The context of level 1 (V) is ``prefixes(q)[0] + g + seps[0][0]`` and that of level 2 (R)
    ``prefixes(q)[1] + g + seps[1][0] + v + seps[1][1]``: a per-question prefix and constant
    separators between the earlier outputs (tokens as sampled, never re-tokenized).

    * ``framing="chat"``: one growing chat, so both prefixes are the question prompt and the
      separators are the role turns: ``seps = ((t_v,), (t_v, t_r))``.
    * ``framing="separate"``: each role has its own system prompt and a user turn quoting the
      question and the earlier outputs (``tasks.prompts.separate_messages``).

    A role's reply prefix (``RolePrompts.verifier_prefix`` / ``refiner_prefix``) ends its
    separator, so it is context, and :meth:`text` puts it back in front of the output.
    """

    tokenizer: Tokenizer
    task: Task
    framing: str = "chat"

    def __post_init__(self) -> None:
        from malt_jax.tasks.prompts import FRAMINGS

        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.framing == "separate" and not self.task.prompts.has_separate:
            raise ValueError(
                f"task {self.task.name!r}: the separate framing needs the role prompts "
                "verifier_separate and refiner_separate"
            )

    def question(self, q: str) -> list[int]:
        return self.tokenizer.encode_chat(role_messages(self.task.prompts, "G", q))

    def _render(self, role: str, q: str) -> str:
        from malt_jax.tasks.prompts import separate_messages

        p = self.task.prompts
        msgs = role_messages if self.framing == "chat" else separate_messages
        return self.tokenizer.apply_chat_template(
            msgs(p, role, q, generator_out=_G, verifier_out=p.verifier_prefix + _V)
        )

    def prefixes(self, q: str) -> tuple[list[int], list[int]]:
        """Per-question prefixes of the V and R contexts (before the generator's answer)."""
        if self.framing == "chat":
            g = self.question(q)
            return g, g
        v, r = (
            self.tokenizer.encode(self._render(role, q).split(_G)[0], add_special_tokens=False) for role in ("V", "R")
        )
        return v, r

    @functools.cached_property
    def seps(self) -> tuple[tuple[list[int]], tuple[list[int], list[int]]]:
        """Constant tokens after each earlier output: ``((after g,), (after g, after v))`` for V, R."""
        tok, p = self.tokenizer, self.task.prompts
        enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        if self.framing == "chat":
            q = "QUESTION"
            s_g = tok.apply_chat_template(role_messages(p, "G", q))
            s_v, s_r = self._render("V", q), self._render("R", q)
            if not (s_v.startswith(s_g + _G) and s_r.startswith(s_v + p.verifier_prefix + _V)):
                raise ValueError(
                    "the chat template does not render the G -> V -> R roles as one growing "
                    "conversation; prefix sharing needs that (check the task's prompts)"
                )
            t_v = enc(s_v[len(s_g) + len(_G) :] + p.verifier_prefix)
            t_r = enc(s_r[len(s_v) + len(p.verifier_prefix) + len(_V) :] + p.refiner_prefix)
            return (t_v,), (t_v, t_r)
        out = []
        for role, prefix in (("V", p.verifier_prefix), ("R", p.refiner_prefix)):
            pieces = [self._render(role, q).split(_G, 1)[1] for q in ("QUESTION A", "QUESTION B")]
            if pieces[0] != pieces[1]:
                raise ValueError(
                    f"the {role} prompt of the separate framing must quote the question before the "
                    "answer and the critique (the text after them must not depend on the question)"
                )
            after = pieces[0].split(_V) if role == "R" else [pieces[0]]
            after[-1] += prefix
            out.append(tuple(enc(t) for t in after))
        return tuple(out)  # type: ignore[return-value]

    @property
    def turns(self) -> tuple[list[int], list[int]]:
        """The chat framing's V and R turn tokens (``seps[1]``)."""
        if self.framing != "chat":
            raise ValueError("turns exist in the chat framing only; use prefixes() and seps")
        return self.seps[1]

    @property
    def stop(self) -> StopCriteria:
        """The tokenizer's stop ids plus the template's end-of-turn token (so a trained role, whose
        SFT completions end with it, stops there whatever the tokenizer calls it)."""
        ids = tuple(self.tokenizer.stop_ids)
        return StopCriteria(stop_ids=ids if self.end_of_turn in ids else ids + (self.end_of_turn,))

    @functools.cached_property
    def end_of_turn(self) -> int:
        """Token appended to a completion that stopped by itself: the first token the template
        writes after an assistant reply."""
        msgs = role_messages(self.task.prompts, "V", "QUESTION", generator_out=_G)[:3]
        text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=False).split(_G, 1)[1]
        return self.tokenizer.encode(text, add_special_tokens=False)[0]

    def text(self, role: str, output: str) -> str:
        """A role's reply as read by graders and later roles: its prefix + the sampled output."""
        return self.task.prompts.prefix(role) + output
