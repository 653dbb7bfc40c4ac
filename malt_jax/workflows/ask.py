"""Ask a trained MALT team one question: N sampled G -> V -> R chains and their majority vote.

    malt-jax ask RUN_DIR "What is 42 - 17?" [--votes 3] [--temperature 0.3] [--json] [--base]

:func:`ask` is the library call (a loaded model, task and adapters); :func:`ask_run` loads them
from a run directory. ``on_turn(role, texts)`` receives each role's turns of all chains as soon
as that role's level has been sampled (the sampler hands every finished level to the host), so
the command line prints G's answers before V has started.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.evaluation.stats import majority_vote
from malt_jax.model.llama import Params
from malt_jax.roles import ROLE_NAMES, ROLES
from malt_jax.sampling.expansion import ExpansionSpec

__all__ = ["ask", "ask_run", "check_question", "format_turns"]


def check_question(text: str, what: str = "the question", *, allow_empty: bool = False) -> str:
    """``text`` unchanged if it can be asked; ValueError (one line) if it is empty or blank
    (unless ``allow_empty``), or not UTF-8 text (a command-line argument with bytes that are not
    UTF-8 arrives with lone surrogates)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    if not allow_empty and not text.strip():
        raise ValueError(f"{what} is empty; ask a question")
    for i, ch in enumerate(text):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            byte = f"byte 0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
            raise ValueError(f"{what} is not UTF-8 text ({byte} at character {i + 1})")
    return text


def ask(
    model: Any,
    task: Any,
    question: str,
    adapters: dict[str, Params] | None = None,
    *,
    votes: int = 3,
    temperature: float = 0.3,
    max_new_tokens: Sequence[int] = (64, 64, 64),
    framing: str = "separate",
    lora_scale: float = 1.0,
    seed: int = 0,
    on_turn: Callable[[str, list[str]], None] | None = None,
    critique: bool = True,
) -> dict[str, Any]:
    """Runs ``votes`` G -> V -> R chains on ``question`` (``adapters`` = the roles' adapters, or
    None for the untrained chain) and majority-votes the refiners' answers by the task's answer
    key. Returns ``{"question", "chains": [{"G", "V", "R"}], "answers", "answer", "votes_for"}``.

    ``critique=False`` (a run trained without a critique, ``tree.critique: false``): the chains
    are G -> (no critique) -> R, V's texts ``""`` and not passed to ``on_turn``; ``adapters``
    then needs G and R only."""
    from malt_jax.config import SamplingConfig
    from malt_jax.sampling.codec import PromptCodec
    from malt_jax.stages.expand import decode_level, sample_trees
    from malt_jax.tasks import Example

    check_question(question)
    if votes < 1:
        raise ValueError(f"--votes must be >= 1, got {votes}")
    codec = PromptCodec(model.tokenizer, task, framing)
    prompt = codec.question(question)
    budgets = tuple(int(b) for b in max_new_tokens)
    if len(budgets) != 3:
        raise ValueError(f"max_new_tokens: one budget per role (G, V, R), got {list(budgets)}")
    longest = max(len(p) for p in codec.prefixes(question)) if framing == "separate" else len(prompt)
    need = longest + sum(budgets) + sum(len(t) for level in codec.seps for t in level)
    if need > model.cfg.max_seq_len:
        raise ValueError(
            f"the question is {len(prompt)} tokens; with the role budgets {list(budgets)} its chain "
            f"needs {need} > the model's context of {model.cfg.max_seq_len} tokens"
        )
    sampling = SamplingConfig(greedy=temperature <= 0, temperature=max(float(temperature), 1e-6))
    spec = ExpansionSpec(
        n=votes,
        m=1,
        l=1,
        depth=3,
        max_new=budgets,
        sampling=sampling,
        stop=codec.stop,
        mode="fork" if adapters else "extend",
        empty_levels=() if critique else (ROLES.index("V"),),
    )
    ads = tuple(adapters.get(r) for r in ROLES) if adapters else (None, None, None)
    ex = Example(id="ask", question=question, answer="")
    chains: list[dict[str, str]] = [{} for _ in range(votes)]

    def on_level(level: int, tokens: np.ndarray, lengths: np.ndarray) -> None:
        role = ROLES[level]
        if level in spec.empty_levels:  # no turn was written
            for c in chains:
                c[role] = ""
            return
        texts = decode_level(
            model.tokenizer, np.asarray(tokens)[:votes], np.asarray(lengths)[:votes], task.prompts.prefix(role)
        ).tolist()
        for c, t in zip(chains, texts):
            c[role] = t
        if on_turn is not None:
            on_turn(role, texts)

    sample_trees(
        model,
        codec,
        [ex],
        spec,
        seed=seed,
        batch_size=1,
        adapters=ads,
        lora_scale=lora_scale,
        progress=False,
        on_level=on_level,
    )
    answers = [task.answer_key(c["R"], ex) for c in chains]
    voted = majority_vote(answers)
    return {
        "question": question,
        "chains": chains,
        "answers": answers,
        "answer": voted,
        "votes_for": Counter(answers)[voted] if voted is not None else 0,
        "votes": votes,
    }


def ask_run(
    run_dir: str | Path,
    question: str,
    *,
    votes: int = 3,
    temperature: float | None = None,
    base: bool = False,
    seed: int = 0,
    on_turn: Callable[[str, list[str]], None] | None = None,
) -> dict[str, Any]:
    """:func:`ask` with the base model, task, prompts, token budgets and role adapters of a run
    directory (``base=True``: the untrained chain; a run trained without a critique,
    ``tree.critique: false``, runs its chain G -> (no critique) -> R). ``temperature`` defaults
    to the run's evaluation temperature. The question is checked before anything is loaded."""
    from malt_jax.config import run_config_of
    from malt_jax.model.base_model import load_model
    from malt_jax.model.lora import lora_scale
    from malt_jax.stages.rundir import load_adapters
    from malt_jax.workflows.pipeline import make_task

    check_question(question)
    if votes < 1:
        raise ValueError(f"--votes must be >= 1, got {votes}")
    run_dir = Path(run_dir)
    cfg = run_config_of(run_dir)
    adapters = None
    if not base:
        adapters, _ = load_adapters(run_dir)
        if adapters is None:
            raise FileNotFoundError(
                f"{run_dir / 'adapters'}: no trained role adapters (G/V/R.safetensors); "
                "run the train stage first, or ask the untrained chain with --base"
            )
    model = load_model(cfg.weights, cfg.model)
    task = make_task(cfg)
    out = ask(
        model,
        task,
        question,
        adapters,
        votes=votes,
        temperature=cfg.eval.temperature if temperature is None else temperature,
        max_new_tokens=cfg.sampling.budgets(cfg.eval.max_new_tokens),
        framing=cfg.task.framing,
        lora_scale=lora_scale(cfg.lora),
        seed=seed,
        on_turn=on_turn,
        critique=base or cfg.tree.critique,
    )
    return {**out, "run_dir": str(run_dir), "trained": not base}


def format_turns(role: str, texts: list[str]) -> str:
    """One role's turns of every chain, for the terminal."""
    name = ROLE_NAMES[role]
    return "\n".join(f"[chain {i + 1}] {name}: {t.strip()}" for i, t in enumerate(texts))
