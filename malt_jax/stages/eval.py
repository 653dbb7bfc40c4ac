"""Stage 4, evaluation: every system on the held-out questions, paired statistics, verifier verdicts.

    <run>/eval/<system>.jsonl   per question: each pass's answer and correctness, the vote, the texts

A :class:`System` is one inference setup (single model or G -> V -> R chain, votes, greedy or
sampled, base or trained adapters); :func:`run_eval` evaluates a list of them (resumable per
system) and compares every trained system with every baseline (exact McNemar, paired bootstrap,
Holm over all but the pre-declared primary comparison, :func:`primary_names`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.config import RunConfig
from malt_jax.model.base_model import Model
from malt_jax.model.llama import Params
from malt_jax.roles import ROLES
from malt_jax.sampling.codec import PromptCodec
from malt_jax.sampling.expansion import ExpansionSpec
from malt_jax.stages.expand import decode_tree, sample_trees
from malt_jax.stages.rundir import read_rows, write_rows
from malt_jax.tasks import Example, Task

__all__ = [
    "System",
    "ABLATIONS",
    "EMPTY_CRITIQUE",
    "SINGLE_TRAINED",
    "default_systems",
    "primary_names",
    "evaluate_system",
    "derive_single",
    "system_results",
    "critique_verdict",
    "verifier_stats",
    "role_skills",
    "run_eval",
]


@dataclasses.dataclass(frozen=True)
class System:
    """An inference run: depth 1 (single model) or 3 (G->V->R chain), ``votes`` parallel passes,
    greedy or sampled, base or trained adapters (``stage`` "final": after SFT and DPO, "sft":
    after SFT only). A run with ``votes > 1`` reports two systems: ``name`` (its first pass
    alone: one sampled chain, no vote) and ``name+MV@k``.

    ``critique=False`` (a chain only): the verifier's turn is left empty, G -> (no critique) -> R:
    V samples nothing (zero tokens, its text ``""``) and R's prompt is the one R is trained on
    with the critique ``""`` (``PromptCodec.empty_critique_seps``: not even the verifier's reply
    prefix), in the run's framing."""

    name: str
    depth: int
    votes: int
    greedy: bool
    trained: bool
    stage: str = "final"
    #: the roles that run with their trained adapters when ``trained`` (the others run the base
    #: model): the paper's role ablations, e.g. ``("generator",)`` = only G trained
    roles: tuple[str, ...] = ROLES
    critique: bool = True

    def __post_init__(self) -> None:
        if not self.critique and self.depth != 3:
            raise ValueError(f"system {self.name!r}: critique=False needs a G -> V -> R chain (depth 3)")


#: The paper's role ablations of the trained chain (MALT's adapters for some roles, the base
#: model for the others): name suffix -> the roles that keep their trained adapters.
ABLATIONS: dict[str, tuple[str, ...]] = {
    "G": ("G",),
    "GV": ("G", "V"),
    "GR": ("G", "R"),  # trained G and R with the untrained V
    "GR0": ("G", "R"),  # trained G and R with an empty critique: G -> (no critique) -> R
}

#: The role ablations of :data:`ABLATIONS` whose verifier turn is left empty (``System.critique``
#: False): ``malt-GR0`` is the paper's "G and R trained, empty critique": no V runs, R refines
#: G's answer from its training prompt with the critique ``""``. Its role skills have no verifier
#: verdicts (:func:`role_skills` with ``critiques=False``) and it has no ``verifier`` entry.
EMPTY_CRITIQUE: frozenset[str] = frozenset({"GR0"})


#: The trained system of single-agent GRPO (``rl.agents: single``): G's trained adapter alone.
SINGLE_TRAINED = "single-trained"


def default_systems(
    votes: int = 3, sft_chain: bool = False, ablations: bool = False, agents: str = "multi", critique: bool = True
) -> list[System]:
    """single-greedy, single (+MV), the untrained chain (+MV), MALT (+MV), with ``sft_chain`` the
    SFT-only trained chain (the paper's STaR-style ablation) and with ``ablations`` the role
    ablations of :data:`ABLATIONS` (``malt-G``, ``malt-GV``, ``malt-GR``, ``malt-GR0``: trained G
    and R with an empty critique, :data:`EMPTY_CRITIQUE`).

    ``critique=False`` (a run that trained G and R with an empty critique, ``tree.critique:
    false``): its trained chains, ``malt`` and ``sft-chain``, are G -> (no critique) -> R with
    the run's G and R adapters (``roles=("G", "R")``, ``critique=False``); the untrained
    baselines are unchanged, and the role ablations (which need a trained V) do not apply.

    ``agents="single"`` (a single-agent GRPO run, ``rl.agents``): no chains; single-greedy, single
    (+MV) and the trained generator alone, ``single-trained`` (+MV); ``sft_chain`` and
    ``ablations`` do not apply."""
    if not critique and ablations:
        raise ValueError("the role ablations need a trained verifier; a chain without a critique has none")
    if agents == "single":
        return [
            System("single-greedy", 1, 1, True, False),
            System("single", 1, votes, False, False),
            System(SINGLE_TRAINED, 1, votes, False, True),
        ]
    systems = [
        System("single-greedy", 1, 1, True, False),
        System("single", 1, votes, False, False),
        System("chain", 3, votes, False, False),
    ]
    chain: dict[str, Any] = {} if critique else {"roles": ("G", "R"), "critique": False}
    if sft_chain:
        systems.append(System("sft-chain", 3, votes, False, True, stage="sft", **chain))
    systems.append(System("malt", 3, votes, False, True, **chain))
    if ablations:
        systems += [
            System(f"malt-{k}", 3, votes, False, True, roles=r, critique=k not in EMPTY_CRITIQUE)
            for k, r in ABLATIONS.items()
        ]
    return systems


def primary_names(votes: int, agents: str = "multi") -> tuple[str, str]:
    """The pre-declared primary comparison: MALT+MV@k vs single+MV@k (MALT vs single at one vote);
    for a single-agent GRPO run (``agents="single"``), single-trained+MV@k vs single+MV@k."""
    suffix = f"+MV@{votes}" if votes > 1 else ""
    target = SINGLE_TRAINED if agents == "single" else "malt"
    return f"{target}{suffix}", f"single{suffix}"


def _score(system: System, task: Task, ex: Example, texts: dict[str, list[str]]) -> dict:
    """One question's row: the final role's ``system.votes`` texts graded, and their vote.

    The vote is taken over the passes' answer keys (``task.answer_key``) and the voted key itself
    is graded (``task.grade_key``: by default the canonical text ``Final Answer: <key>``), not
    the first pass that gave it: passes sharing a key need not share a grade."""
    from malt_jax.evaluation.stats import majority_vote

    finals = texts[ROLES[system.depth - 1]]
    answers = [task.answer_key(t, ex) for t in finals]
    correct = [bool(task.grade_example(t, ex)) for t in finals]
    voted = majority_vote(answers)
    return {
        "id": ex.id,
        "gold": ex.answer,
        "pass_answers": answers,
        "pass_correct": correct,
        "vote_answer": voted,
        "vote_correct": bool(voted is not None and task.grade_key(voted, ex)),
        "texts": texts,
    }


def evaluate_system(
    system: System,
    cfg: RunConfig,
    model: Model,
    task: Task,
    examples: Sequence[Example],
    adapters: dict[str, Params] | None,
    out_path: Path,
    progress: bool = True,
    mesh=None,
) -> list[dict]:
    """Runs one system on ``examples``; per-question rows, also written as jsonl."""
    from malt_jax.model.lora import lora_scale

    rows = read_rows(out_path, len(examples))
    if rows is not None:
        return rows
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    e = cfg.eval
    sampling = dataclasses.replace(cfg.sampling, greedy=system.greedy, temperature=e.temperature)
    trained = system.trained and adapters is not None
    spec = ExpansionSpec(
        n=system.votes,
        m=1,
        l=1,
        depth=system.depth,
        max_new=cfg.sampling.budgets(e.max_new_tokens),
        sampling=sampling,
        stop=codec.stop,
        mode="fork" if trained else "extend",
        empty_levels=() if system.critique else (ROLES.index("V"),),
    )
    ads = (
        tuple(adapters[r] if r in system.roles else None for r in ROLES)
        if trained and adapters is not None
        else (None, None, None)
    )
    rows = []

    def on_batch(b: int, arrays: dict) -> None:
        texts = decode_tree(codec, arrays, ROLES[: system.depth], empty=() if system.critique else ("V",))
        for q, i in enumerate(arrays["index"]):
            rows.append(_score(system, task, examples[i], {r: texts[r][q].reshape(-1).tolist() for r in texts}))

    # as many batches as batch_questions asks for, of equal size (no batch mostly padding)
    most = max(1, min(len(examples), e.batch_questions or len(examples)))
    batch = -(-len(examples) // -(-len(examples) // most))
    sample_trees(
        model,
        codec,
        examples,
        spec,
        seed=e.seed,
        batch_size=batch,
        adapters=ads,
        lora_scale=lora_scale(cfg.lora),
        on_batch=on_batch,
        desc=f"eval {system.name}",
        progress=progress,
        mesh=mesh,
    )
    write_rows(out_path, rows)
    return rows


def _shares_generator(single: System, chain: System) -> bool:
    """Whether ``single``'s samples are exactly ``chain``'s generator level: the untrained chain's
    first role is the single model, sampled with the same keys (see ``question_keys``)."""
    return (
        single.depth == 1
        and chain.depth > 1
        and not single.trained
        and not chain.trained
        and single.votes == chain.votes
        and single.greedy == chain.greedy
    )


def derive_single(
    single: System, chain_rows: list[dict], task: Task, examples: Sequence[Example], out_path: Path
) -> list[dict]:
    """``single``'s rows scored from the untrained chain's generator texts (no new sampling)."""
    rows = [_score(single, task, ex, {"G": r["texts"]["G"]}) for ex, r in zip(examples, chain_rows, strict=True)]
    write_rows(out_path, rows)
    return rows


def system_results(system: System, rows: list[dict]) -> dict:
    """``SystemResult``s of a run: its first pass, and its majority vote when it has several."""
    from malt_jax.evaluation.stats import SystemResult

    out = {
        system.name: SystemResult(
            system.name, np.asarray([r["pass_correct"][0] for r in rows], bool), [r["pass_answers"][0] for r in rows]
        )
    }
    if system.votes > 1:
        name = f"{system.name}+MV@{system.votes}"
        out[name] = SystemResult(
            name, np.asarray([r["vote_correct"] for r in rows], bool), [r["vote_answer"] for r in rows]
        )
    return out


_VERDICT_LINE = re.compile(r"verdict\s*[:：]", re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"(?:the\s+)?correct\s+answer\s+is|final\s+answer", re.IGNORECASE)
_STATED = re.compile(r"correct\s+answer\s+is\s*:?", re.IGNORECASE)


def _stated_answer(task: Task, critique: str, example: Example) -> str | None:
    """The answer a critique states: the first sentence after "the correct answer is" (else
    its final answer, e.g. a ``Final Answer:`` line), as ``task.answer_key``."""
    m = _STATED.search(critique)
    if m:
        sentence = re.split(r"\n|\.\s|,\s", critique[m.end() :].strip(), maxsplit=1)[0]
        return task.answer_key("Final Answer: " + sentence, example)
    return task.answer_key(critique, example)


def critique_verdict(task: Task, critique: str, answer: str, example: Example) -> bool | None:
    """What a critique says of the answer it checked: True (correct), False (incorrect), None.

    An explicit ``Verdict:`` line decides; else a critique that states an answer of its own
    ("The correct answer is 12." -- the first sentence after that phrase) agrees iff that answer
    has the checked answer's key (``task.answer_key``); else the first verdict word ("correct",
    "incorrect", "wrong"), with answer-announcing phrases such as "the correct answer is" ignored.
    An empty (or blank) critique says nothing: None.
    """
    from malt_jax.evaluation.stats import parse_verdict

    if not critique.strip():
        return None
    if _VERDICT_LINE.search(critique):
        return parse_verdict(critique)
    stated = _stated_answer(task, critique, example)
    if stated is not None:
        return stated == task.answer_key(answer, example)
    return parse_verdict(_ANSWER_PHRASE.sub(" ", critique))


def verifier_stats(task: Task, examples: Sequence[Example], rows: list[dict]) -> dict:
    """Confusion matrix of a chain's verifier verdicts (:func:`critique_verdict`) against its
    generator answers' real correctness, over every pass of every question
    (``evaluate.verifier_confusion``)."""
    from malt_jax.evaluation.stats import verifier_confusion

    right, said = [], []
    for ex, r in zip(examples, rows, strict=True):
        for g, v in zip(r["texts"]["G"], r["texts"]["V"], strict=True):
            right.append(bool(task.grade_example(g, ex)))
            said.append(critique_verdict(task, v, g, ex))
    return verifier_confusion(right, said)


def role_skills(task: Task, examples: Sequence[Example], rows: list[dict], critiques: bool = True) -> dict:
    """The measured skills of a chain's roles over every pass of every question: G's accuracy,
    V's verdict confusion against G's actual correctness (:func:`verifier_stats`) and R's fix
    rate (its final answer right | G's answer wrong) and break rate (wrong | G's right).

    ``critiques=False`` (a chain whose verifier turn is empty, ``System.critique``): V gave no
    critique to judge, so its confusion holds no verdicts at all (``n`` 0, NaN rates) instead of
    counting every pass as "no verdict"."""
    from malt_jax.evaluation.stats import verifier_confusion

    g_right, r_right = [], []
    for ex, r in zip(examples, rows, strict=True):
        for g, fin in zip(r["texts"]["G"], r["texts"]["R"], strict=True):
            g_right.append(bool(task.grade_example(g, ex)))
            r_right.append(bool(task.grade_example(fin, ex)))
    n_right = sum(g_right)
    n_wrong = len(g_right) - n_right
    fixed = sum(1 for g, r in zip(g_right, r_right) if not g and r)
    broken = sum(1 for g, r in zip(g_right, r_right) if g and not r)
    return {
        "generator": {"accuracy": n_right / len(g_right) if g_right else float("nan"), "n": len(g_right)},
        "verifier": verifier_stats(task, examples, rows) if critiques else verifier_confusion([], []),
        "refiner": {
            "fix_rate": fixed / n_wrong if n_wrong else float("nan"),
            "break_rate": broken / n_right if n_right else float("nan"),
            "fixed": fixed,
            "broken": broken,
            "g_wrong": n_wrong,
            "g_right": n_right,
            "accuracy": sum(r_right) / len(r_right) if r_right else float("nan"),
        },
    }


def run_eval(
    cfg: RunConfig,
    model: Model,
    task: Task,
    examples: Sequence[Example],
    run_dir: str | Path,
    adapters: dict[str, Params] | None,
    systems: Sequence[System] | None = None,
    progress: bool = True,
    mesh=None,
    sft_adapters: dict[str, Params] | None = None,
    out: Path | None = None,
) -> dict:
    """Stage 4: every system on the held-out questions, paired statistics, verifier verdicts.

    ``adapters`` / ``sft_adapters``: the roles' adapters after DPO / after SFT only (systems
    that need missing adapters are skipped). ``systems``: default :func:`default_systems` of the
    ``eval`` section (those of ``agents="single"`` for a single-agent GRPO run, ``rl.agents``;
    without a critique, ``tree.critique: false``, the trained chains G -> (no critique) -> R).

    Returns ``results`` (name -> SystemResult), ``comparisons`` (every trained system vs every
    baseline, and MALT vs the SFT-only chain; the pre-declared primary comparison,
    :func:`primary_names`, is marked ``primary`` and the others carry Holm-adjusted p-values
    ``p_holm``), ``verifier`` (chain name -> verdict confusion; not the chains without a
    critique, ``System.critique``) and ``skills`` (chain name -> :func:`role_skills`: G accuracy,
    V confusion, R fix / break rates).
    """
    from malt_jax.evaluation.stats import compare, holm

    out = out or Path(run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    agents = cfg.rl.agents if cfg.rl.iterations > 0 else "multi"  # a single-agent GRPO run: no chains
    systems = list(
        systems or default_systems(cfg.eval.votes, cfg.eval.sft_chain, cfg.eval.ablations, agents, cfg.tree.critique)
    )
    # the run's own trained chain (its roles and critique); a trained system otherwise is a role ablation
    own_chain = (cfg.tree.roles, cfg.tree.critique)
    by_stage = {"final": adapters, "sft": sft_adapters}
    # A single-model system whose samples are an untrained chain's generator level is scored
    # from that chain's texts: the chain runs first and the single model is not sampled again.
    source = {s.name: next((c for c in systems if _shares_generator(s, c)), None) for s in systems}
    order = sorted(systems, key=lambda s: source[s.name] is not None)
    results, trained_names, verifier, skills = {}, [], {}, {}
    ablation_names: set[str] = set()
    all_rows: dict[str, list[dict]] = {}
    for sys_ in order:
        ads = by_stage.get(sys_.stage) if sys_.trained else None
        if sys_.trained and ads is None:
            continue
        path = out / f"{sys_.name}.jsonl"
        chain = source[sys_.name]
        if chain is not None and read_rows(path, len(examples)) is None:
            rows = derive_single(sys_, all_rows[chain.name], task, examples, path)
        else:
            rows = evaluate_system(sys_, cfg, model, task, examples, ads, path, progress, mesh=mesh)
        all_rows[sys_.name] = rows
        if sys_.depth == 3:
            skills[sys_.name] = role_skills(task, examples, rows, critiques=sys_.critique)
            if sys_.critique:  # an empty critique has no verdicts to report
                verifier[sys_.name] = skills[sys_.name]["verifier"]
    for sys_ in systems:  # the report lists systems in the given order
        if sys_.name in all_rows:
            res = system_results(sys_, all_rows[sys_.name])
            results.update(res)
            if sys_.trained:
                trained_names += list(res)
            if sys_.trained and sys_.depth == 3 and (sys_.roles, sys_.critique) != own_chain:
                ablation_names |= set(res)
    baselines = [n for n in results if n not in trained_names]
    comparisons = []
    # every trained chain vs every baseline; MALT also vs the SFT-only chain and vs its role
    # ablations (which are compared with MALT only) at the same number of votes
    for target in [n for n in trained_names if n not in ablation_names]:
        suffix = target[len("malt") :] if target.startswith("malt") else None
        others = baselines + [
            n
            for n in trained_names
            if suffix is not None
            and n != target
            and (n.startswith("sft-chain") or n in ablation_names)
            and n.endswith(suffix)
            and ("+MV" in n) == ("+MV" in target)
        ]
        comparisons += compare(results, target, others, cfg.eval.bootstrap_samples, cfg.eval.seed)
    primary = primary_names(cfg.eval.votes, agents)
    for c in comparisons:
        c["primary"] = (c["target"], c["baseline"]) == primary
    rest = [c for c in comparisons if not c["primary"]]
    for c, p in zip(rest, holm([c["mcnemar_p"] for c in rest])):
        c["p_holm"] = p
    for c in comparisons:
        if c["primary"]:
            c["p_holm"] = c["mcnemar_p"]
    return {"results": results, "comparisons": comparisons, "verifier": verifier, "skills": skills}
