"""Prompts as tokens: the G -> V -> R contexts of a task, in the chat or the separate framing."""

from __future__ import annotations

import dataclasses
import functools
import re

from malt_jax.model.tokenizer import Tokenizer
from malt_jax.sampling.decode import StopCriteria
from malt_jax.tasks import Task, role_messages

__all__ = ["PromptCodec"]

Parts = list[tuple[str, bool]]  # (text, literal) pieces of a rendered chat (Tokenizer.chat_parts)


def _split_at(parts: Parts, holes: tuple[str, ...]) -> list[Parts]:
    """``parts`` cut where each of ``holes`` (each exactly once, in order) stands; holes removed."""
    pattern = re.compile("|".join(re.escape(h) for h in holes))
    out: list[Parts] = [[]]
    found = []
    for text, literal in parts:
        pos = 0
        for m in pattern.finditer(text):
            out[-1].append((text[pos : m.start()], literal))
            found.append(m.group())
            out.append([])
            pos = m.end()
        out[-1].append((text[pos:], literal))
    if tuple(found) != holes:
        raise ValueError(
            "the chat template must write each earlier output exactly once, in the order of the roles "
            f"(found {len(found)} of {len(holes)}); prefix sharing needs that (check the task's prompts)"
        )
    return [[(t, lit) for t, lit in seg if t] for seg in out]


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

    :attr:`empty_critique_seps` are the separators of a chain whose verifier turn is left empty
    (the role ablation G -> no critique -> R): R's context is the one R is trained on with zero
    critique tokens and without the verifier's reply prefix, i.e. its prompt rendered with the
    critique ``""`` (so R reads no critique at all). Like every context it is not re-rendered: a
    template that trims message contents (Llama 3.1, Gemma) would drop the whitespace before an
    empty critique that ends a separate-framing turn; this context keeps it, as it would before
    any critique.

    The question and the role prompts are plain text (only the template's own markers are control
    tokens, see ``Tokenizer.chat_parts``); the earlier outputs are their sampled ids. The outputs'
    places are found by position: they are rendered as hole strings that occur nowhere else (not
    in the question, whatever it holds), and each must be found once, in order.
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

    def _holes(self, q: str) -> tuple[str, str]:
        """Stand-ins for G's and V's outputs that occur in neither ``q``, the prompts nor the
        template. Their first character occurs once in each, so an occurrence cannot straddle
        the text around it: finding each once means finding it where it was put."""
        p = self.task.prompts
        texts = [q, self.tokenizer.chat_template or ""]
        texts += [v for v in (getattr(p, f.name) for f in dataclasses.fields(p)) if isinstance(v, str)]

        def fresh(name: str) -> str:
            hole = f"\ue000{name}\ue001"
            while any(hole in t for t in texts):
                hole += "\ue001"
            return hole

        return fresh("G"), fresh("V")

    def _messages(self, role: str, q: str, g: str, v: str, v_prefix: bool = True) -> list[dict[str, str]]:
        from malt_jax.tasks.prompts import separate_messages

        p = self.task.prompts
        msgs = role_messages if self.framing == "chat" else separate_messages
        return msgs(p, role, q, generator_out=g, verifier_out=(p.verifier_prefix if v_prefix else "") + v)

    def _segments(self, role: str, q: str, v_prefix: bool = True) -> list[Parts]:
        """``role``'s rendered prompt for question ``q``, cut at the earlier outputs:
        ``[before G's output, after it]`` for V, ``[before, between G's and V's, after]`` for R
        (``v_prefix=False``: V's output rendered without the verifier's reply prefix)."""
        g, v = self._holes(q)
        parts = self.tokenizer.chat_parts(self._messages(role, q, g, v, v_prefix))
        return _split_at(parts, (g,) if role == "V" else (g, v))

    def prefixes(self, q: str) -> tuple[list[int], list[int]]:
        """Per-question prefixes of the V and R contexts (before the generator's answer)."""
        if self.framing == "chat":
            g = self.question(q)
            return g, g
        v, r = (self.tokenizer.encode_parts(self._segments(role, q)[0]) for role in ("V", "R"))
        return v, r

    @functools.cached_property
    def seps(self) -> tuple[tuple[list[int]], tuple[list[int], list[int]]]:
        """Constant tokens after each earlier output: ``((after g,), (after g, after v))`` for V, R."""
        return self._separators(critique=True)

    @functools.cached_property
    def empty_critique_seps(self) -> tuple[tuple[list[int]], tuple[list[int], list[int]]]:
        """:attr:`seps` of a chain whose verifier turn is empty (zero tokens, not sampled: the
        role ablation G -> no critique -> R): R's separator after G's answer lacks the verifier's
        reply prefix, so ``prefixes(q)[1] + g + seps[1][0] + seps[1][1]`` is R's prompt rendered
        with the critique ``""`` (in the chat framing: an empty verifier reply). V's own
        separator is :attr:`seps`'s."""
        return self._separators(critique=False)

    def _separators(self, critique: bool) -> tuple[tuple[list[int]], tuple[list[int], list[int]]]:
        """:attr:`seps` (``critique=False``: :attr:`empty_critique_seps`)."""
        tok, p = self.tokenizer, self.task.prompts
        if self.framing == "chat":
            q = "QUESTION"
            g, v = self._holes(q)
            s_g = tok.apply_chat_template(role_messages(p, "G", q))
            s_v, s_r = (tok.apply_chat_template(self._messages(role, q, g, v)) for role in ("V", "R"))
            if not (s_v.startswith(s_g + g) and s_r.startswith(s_v + p.verifier_prefix + v)):
                raise ValueError(
                    "the chat template does not render the G -> V -> R roles as one growing "
                    "conversation; prefix sharing needs that (check the task's prompts)"
                )
            t_v = tok.encode_parts([*self._segments("V", q)[1], (p.verifier_prefix, True)])
            t_r = tok.encode_parts([*self._segments("R", q)[2], (p.refiner_prefix, True)])
            # an empty verifier turn: the reply opened, nothing written, closed by R's turn
            return (t_v,), (t_v if critique else tok.encode_parts(self._segments("V", q)[1]), t_r)
        out = []
        for role, prefix in (("V", p.verifier_prefix), ("R", p.refiner_prefix)):
            pieces = [self._segments(role, q, v_prefix=critique)[1:] for q in ("QUESTION A", "QUESTION B")]
            if pieces[0] != pieces[1]:
                raise ValueError(
                    f"the {role} prompt of the separate framing must quote the question before the "
                    "answer and the critique (the text after them must not depend on the question)"
                )
            after = pieces[0]
            after[-1] = [*after[-1], (prefix, True)]
            out.append(tuple(tok.encode_parts(seg) for seg in after))
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
        g, _ = self._holes("QUESTION")
        msgs = role_messages(self.task.prompts, "V", "QUESTION", generator_out=g)[:3]
        after = _split_at(self.tokenizer.chat_parts(msgs, add_generation_prompt=False), (g,))[1]
        return self.tokenizer.encode_parts(after)[0]

    def text(self, role: str, output: str) -> str:
        """A role's reply as read by graders and later roles: its prefix + the sampled output."""
        return self.task.prompts.prefix(role) + output
