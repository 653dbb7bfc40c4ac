"""The testbed study (``make testbed-study``): where MALT pays on a model whose roles can learn.

    python experiments/testbed_study.py                 # every part, resumable (rerun to continue)
    python experiments/testbed_study.py --parts seeds   # one part: seeds | gr0 | phase | curve

Declared before any run (none of it was chosen on the evaluation questions):

* **Primary comparison**: at the default testbed (``experiments/testbed.yaml``, verifier corpus
  rates v_detect 0.8 / v_false_alarm 0.2), MALT+MV@3 vs single+MV@3, pooled over the seeds
  (sign-flip test over questions of the seed-averaged difference,
  ``evaluation.stats.seeds_paired_test``), with each seed's exact McNemar test beside it. Every
  other comparison carries a Holm-adjusted p-value within its family.
* **seeds**: the MALT stage (tree sampling and training, ``train.seed``) with seeds 0, 1, 2 on
  one pretrained model (``models/testbed``), 1000 held-out test questions, every system and the
  paper's role ablations (``eval.ablations``: only G trained; G+V; trained G and R with the
  untrained V; trained G and R with an empty critique, ``malt-GR0``, added after the seeds had
  run: its figures come from the runs evaluated since).
* **gr0**: the paper's role ablation "G and R trained with an empty critique" as a training run
  of its own per seed (``tree.critique: false``: trees of one empty critique per answer and
  ``GR0_TREE``'s refinements, G and R trained on them, no verifier), the seed runs' overrides
  otherwise; its chain G -> (no critique) -> R is the seeds summary's ``gr0-trained`` (+MV@3),
  compared with the same seed's MALT (McNemar per seed; pooled over the seeds with a GR0 run, a
  Holm family of its own, ``GR0_PAIRS``). Added after the seeds had run.
* **phase**: the base verifier's skill set through the corpus (v_detect, v_false_alarm) = (0.5,
  0.5), (0.65, 0.35), (0.8, 0.2), (1.0, 0.0), one model pretrained per level (the same
  pretraining config otherwise), the MALT stage with seed 0 on each; x = the base chain's
  measured verifier balanced accuracy, y = MALT+MV@3 minus single+MV@3 and minus
  SFT-chain+MV@3. The 0.8 level is the seeds part's seed 0.
* **curve**: the learning curve at the default testbed, MALT on nested training sets of 32 / 100
  / 320 questions (one shared expansion; ``malt-jax study``).

Outputs: ``results/testbed_study.json`` (seeds, pooled tests, role skills, targets),
``results/testbed_study_phase.json`` + ``.png`` and ``results/testbed_study_curve.json`` +
``.png``; each is rewritten as its part's runs land (``"complete": false`` until all have).
Run directories under ``runs/testbed_study/``, models under ``models/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIG = "experiments/testbed.yaml"
PRETRAIN_CONFIG = "experiments/pretrain/testbed.yaml"
SEEDS = (0, 1, 2)
N_EVAL = 1000
DEFAULT_LEVEL = (0.8, 0.2)
LEVELS = ((0.5, 0.5), (0.65, 0.35), (0.8, 0.2), (1.0, 0.0))
TRAIN_SIZES = (32, 100, 320)
VOTES = 3
PARTS = ("seeds", "gr0", "phase", "curve")

MV = f"+MV@{VOTES}"
PRIMARY = (f"malt{MV}", f"single{MV}")
# the pooled family (Holm within it, the primary apart): MALT against each baseline and ablation
POOLED = [
    (f"malt{MV}", f"chain{MV}"),
    (f"malt{MV}", f"sft-chain{MV}"),
    (f"malt{MV}", "single-greedy"),
    ("malt", "chain"),
    ("malt", "sft-chain"),
    ("malt", "single"),
    (f"malt{MV}", f"malt-G{MV}"),
    (f"malt{MV}", f"malt-GV{MV}"),
    (f"malt{MV}", f"malt-GR{MV}"),
    (f"malt{MV}", f"malt-GR0{MV}"),
]
# G and R trained with an empty critique (the gr0 part): one empty critique per answer (tree.m
# must be 1) and as many refinements of each answer as the seed runs' trees hold (m x l = 3 x 3,
# experiments/testbed.yaml), so G's values average as many leaves and R is sampled as often
GR0 = "gr0-trained"
GR0_TREE = ("tree.critique=false", "tree.m=1", "tree.l=9")
# the gr0 family (Holm within it, apart from the pre-declared family): MALT against it
GR0_PAIRS = [(f"malt{MV}", f"{GR0}{MV}"), ("malt", GR0)]


def level_tag(level: tuple[float, float]) -> str:
    return f"v{round(level[0] * 100):03d}f{round(level[1] * 100):03d}"


def model_dir(level: tuple[float, float]) -> str:
    return "models/testbed" if level == DEFAULT_LEVEL else f"models/testbed_{level_tag(level)}"


def corpus_overrides(level: tuple[float, float], prefix: str) -> list[str]:
    return [f"{prefix}.v_detect={level[0]}", f"{prefix}.v_false_alarm={level[1]}"]


def ensure_model(level: tuple[float, float], progress: bool) -> dict:
    """Pretrains the base model of a verifier level (skipped when finished); its summary."""
    from malt_jax.training.pretrain import pretrain
    from malt_jax.training.pretrain_config import load_pretrain_config

    over = [f"out_dir={model_dir(level)}", *corpus_overrides(level, "corpus.options")]
    if level != DEFAULT_LEVEL:
        over.append(f"name=testbed_{level_tag(level)}")
    cfg = load_pretrain_config(PRETRAIN_CONFIG, over)
    return pretrain(cfg, progress=progress, command=" ".join(["malt-jax pretrain", PRETRAIN_CONFIG, *over]))


def run_overrides(level: tuple[float, float], seed: int, ablations: bool) -> tuple[str, list[str]]:
    name = f"testbed_study_{level_tag(level)}_s{seed}"
    return name, [
        f"name={name}",
        f"run_dir=runs/testbed_study/{level_tag(level)}_s{seed}",
        f"weights={model_dir(level)}",
        "results=''",
        f"train.seed={seed}",
        f"task.num_eval={N_EVAL}",
        "eval.sft_chain=true",
        f"eval.ablations={'true' if ablations else 'false'}",
        *corpus_overrides(level, "task.options"),
    ]


def gr0_tag(seed: int) -> str:
    return f"{level_tag(DEFAULT_LEVEL)}_gr0_s{seed}"


def gr0_overrides(seed: int) -> tuple[str, list[str]]:
    """The run of G and R trained with an empty critique at the default level: the seed run's
    overrides (no role ablations: they need a trained V), its own name and run dir, ``GR0_TREE``."""
    name = f"testbed_study_{gr0_tag(seed)}"
    _, over = run_overrides(DEFAULT_LEVEL, seed, ablations=False)
    own = [f"name={name}", f"run_dir=runs/testbed_study/{gr0_tag(seed)}"]
    return name, own + [o for o in over if not o.startswith(("name=", "run_dir="))] + list(GR0_TREE)


def run_gr0(seed: int, progress: bool) -> dict:
    """The run of G and R trained with an empty critique of one seed (resumable); its summary."""
    from malt_jax.config import load_run_config
    from malt_jax.workflows.pipeline import run

    _, over = gr0_overrides(seed)
    cfg = load_run_config(RUN_CONFIG, over)
    run(cfg, progress=progress, command=" ".join(["malt-jax run", RUN_CONFIG, *over]))
    return json.loads((Path(cfg.run_dir) / "summary.json").read_text())


def seed_records() -> dict[int, dict]:
    """The summaries of the seed runs finished so far (what the seeds part records)."""
    out = {}
    for s in SEEDS:
        path = ROOT / "runs/testbed_study" / f"{level_tag(DEFAULT_LEVEL)}_s{s}" / "summary.json"
        if path.exists():
            out[s] = json.loads(path.read_text())
    return out


def gr0_records() -> dict[int, dict]:
    """The summaries of the gr0 part's runs finished so far."""
    out = {}
    for s in SEEDS:
        path = ROOT / "runs/testbed_study" / gr0_tag(s) / "summary.json"
        if path.exists():
            out[s] = json.loads(path.read_text())
    return out


def gr0_correctness(seed: int) -> dict[str, Any]:
    """``gr0-trained`` (+MV@3) -> correctness per question: the chain (``malt``) of the seed's run
    trained with an empty critique."""
    runs = correctness(ROOT / "runs/testbed_study" / gr0_tag(seed))
    return {GR0 + n[len("malt") :]: c for n, c in runs.items() if n in ("malt", f"malt{MV}")}


def run_malt(level: tuple[float, float], seed: int, ablations: bool, progress: bool) -> dict:
    """The MALT stage (expand, credit, train, eval) of one level and seed; its summary record."""
    from malt_jax.config import load_run_config
    from malt_jax.workflows.pipeline import run

    name, over = run_overrides(level, seed, ablations)
    cfg = load_run_config(RUN_CONFIG, over)
    run(cfg, progress=progress, command=" ".join(["malt-jax run", RUN_CONFIG, *over]))
    return json.loads((Path(cfg.run_dir) / "summary.json").read_text())


def correctness(run_dir: Path, votes: int = VOTES) -> dict[str, Any]:
    """name -> boolean correctness per question of every evaluated system of a run."""
    import numpy as np

    from malt_jax.stages.eval import default_systems, system_results
    from malt_jax.stages.rundir import read_rows

    out = {}
    for system in default_systems(votes, sft_chain=True, ablations=True):
        path = run_dir / "eval" / f"{system.name}.jsonl"
        rows = read_rows(path, N_EVAL) if path.exists() else None
        if rows is not None:
            out.update({n: np.asarray(r.correct) for n, r in system_results(system, rows).items()})
    return out


def skills_line(summary: dict, chain: str) -> dict[str, Any]:
    s = summary["skills"].get(chain, {})
    v, r = s.get("verifier", {}), s.get("refiner", {})
    return {
        "generator_accuracy": s.get("generator", {}).get("accuracy"),
        "verifier_balanced_accuracy": v.get("balanced_accuracy"),
        "refiner_fix_rate": r.get("fix_rate"),
        "refiner_break_rate": r.get("break_rate"),
    }


def seed_tests(correct: dict[str, Any], pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """One seed's comparisons ``a vs b`` (both evaluated): accuracy difference, exact McNemar p
    and its discordant counts. ``correct``: name -> boolean correctness per question."""
    from malt_jax.evaluation.stats import mcnemar_exact

    tests = {}
    for a, b in pairs:
        if a in correct and b in correct:
            mc = mcnemar_exact(correct[a], correct[b])
            diff = float(correct[a].mean() - correct[b].mean())
            tests[f"{a} vs {b}"] = {"diff": diff, "p": mc["p_value"], "b01": mc["b01"], "b10": mc["b10"]}
    return tests


def pooled_tests(correct: dict[int, dict[str, Any]], pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """The comparisons ``a vs b`` evaluated in every seed, pooled over seeds
    (``seeds_paired_test``) with ``same_sign_every_seed``; ``pairs[0]`` is the primary (flagged,
    no Holm), the rest get Holm-adjusted ``p_holm`` within their family."""
    import numpy as np

    from malt_jax.evaluation.stats import holm, seeds_paired_test

    seeds = sorted(correct)
    pooled = {}
    for a, b in pairs:
        if all(a in correct[s] and b in correct[s] for s in seeds):
            out = seeds_paired_test(np.stack([correct[s][a] for s in seeds]), np.stack([correct[s][b] for s in seeds]))
            signs = {int(np.sign(d)) for d in out["diffs"]}
            pooled[f"{a} vs {b}"] = {**out, "same_sign_every_seed": len(signs) == 1 and 0 not in signs}
    key = "{} vs {}".format(*pairs[0])
    rest = [k for k in pooled if k != key]
    for k, p in zip(rest, holm([pooled[k]["p_value"] for k in rest])):
        pooled[k]["p_holm"] = p
    if key in pooled:
        pooled[key]["primary"] = True
    return pooled


def seeds_summary(records: dict[int, dict], command: str, wall: float) -> dict[str, Any]:
    """Per-seed tables and exact McNemar tests, comparisons pooled over seeds, the targets.

    The gr0 part's runs finished so far (read from their run directories) add ``gr0-trained``
    (+MV@3) to the seeds that have one, their tests against that seed's MALT (``GR0_PAIRS``;
    pooled over those seeds, Holm within that family) and a ``gr0`` record."""
    import numpy as np

    from malt_jax.runtime.machine import machine_info

    seeds = sorted(records)
    runs = {s: ROOT / "runs/testbed_study" / f"{level_tag(DEFAULT_LEVEL)}_s{s}" for s in seeds}
    correct = {s: correctness(runs[s]) for s in seeds}
    gr0 = {s: rec for s, rec in gr0_records().items() if s in records}
    for s in gr0:
        correct[s].update(gr0_correctness(s))
    per_seed = {}
    for s in seeds:
        rec = records[s]
        tests = seed_tests(correct[s], [PRIMARY, *POOLED])
        per_seed[str(s)] = {
            "systems": rec["systems"],
            "tests": tests,
            "skills": {c: skills_line(rec, c) for c in ("chain", "sft-chain", "malt")},
            "training": rec.get("training"),
            "wall_time_s": rec["wall_time_s"],
        }
        if s in gr0:
            g = gr0[s]["systems"]
            per_seed[str(s)]["systems"] = {**rec["systems"], GR0: g["malt"], f"{GR0}{MV}": g[f"malt{MV}"]}
            tests.update(seed_tests(correct[s], GR0_PAIRS))
            # its chain has no critique: no verifier verdicts to score
            per_seed[str(s)]["skills"][GR0] = {**skills_line(gr0[s], "malt"), "verifier_balanced_accuracy": None}
    pooled = pooled_tests(correct, [PRIMARY, *POOLED])
    if gr0:
        # the gr0 family over the seeds that have its run: PRIMARY leads the list only to keep the
        # family's pairs out of pooled_tests' primary slot (its pooled figure here is dropped)
        family = pooled_tests({s: correct[s] for s in gr0}, [PRIMARY, *GR0_PAIRS])
        pooled.update({k: v for k, v in family.items() if k != "{} vs {}".format(*PRIMARY)})

    def mean_of(key: str, chain: str) -> float | None:
        xs = [per_seed[str(s)]["skills"][chain][key] for s in seeds]
        return None if any(x is None for x in xs) else float(np.mean(xs))

    v_gain = [
        per_seed[str(s)]["skills"]["malt"]["verifier_balanced_accuracy"]
        - per_seed[str(s)]["skills"]["chain"]["verifier_balanced_accuracy"]
        for s in seeds
    ]
    beat = [f"{PRIMARY[0]} vs {PRIMARY[1]}", f"{PRIMARY[0]} vs chain{MV}", f"{PRIMARY[0]} vs sft-chain{MV}"]
    targets = {
        "beats_single_chain_sftchain_mv": all(
            k in pooled
            and pooled[k]["diff"] > 0
            and pooled[k].get("p_holm", pooled[k]["p_value"]) < 0.05
            and pooled[k]["same_sign_every_seed"]
            for k in beat
        ),
        "verifier_balanced_accuracy_gain": float(np.mean(v_gain)),
        "verifier_gain_at_least_0.10": bool(np.mean(v_gain) >= 0.10),
        "refiner_fix_rate": {"base": mean_of("refiner_fix_rate", "chain"), "malt": mean_of("refiner_fix_rate", "malt")},
        "refiner_break_rate": {
            "base": mean_of("refiner_break_rate", "chain"),
            "malt": mean_of("refiner_break_rate", "malt"),
        },
    }
    return {
        "experiment": "testbed_study",
        "command": command,
        "complete": seeds == list(SEEDS),
        "primary": "{} vs {}".format(*PRIMARY),
        "seeds": seeds,
        "n_eval": N_EVAL,
        "n_train": records[seeds[0]]["n_train"],
        "votes": VOTES,
        "model": model_dir(DEFAULT_LEVEL),
        "per_seed": per_seed,
        "pooled": pooled,
        "targets": targets,
        **({"gr0": gr0_record(gr0)} if gr0 else {}),
        "wall_time_s": round(wall, 1),
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
    }


def gr0_record(gr0: dict[int, dict]) -> dict[str, Any]:
    """What the seeds summary says of the gr0 part's runs (``gr0``: seed -> run summary)."""
    return {
        "system": GR0,
        "what": "G and R trained with an empty critique (tree.critique: false), one run per seed; its "
        "chain G -> (no critique) -> R is gr0-trained",
        "command": "python experiments/testbed_study.py --parts gr0",
        "overrides": list(GR0_TREE),
        "seeds": sorted(gr0),
        "complete": sorted(gr0) == list(SEEDS),
        "holm_family": ["{} vs {}".format(*p) for p in GR0_PAIRS],
        "run_dirs": [f"runs/testbed_study/{gr0_tag(s)}" for s in sorted(gr0)],
        "wall_time_s": round(sum(r["wall_time_s"] for r in gr0.values()), 1),
    }


def phase_summary(points: dict[tuple[float, float], dict], pretrain: dict, command: str, wall: float) -> dict:
    """One point per verifier level: the base chain's measured skills and MALT's gains."""
    from malt_jax.runtime.machine import machine_info

    rows = []
    for level in LEVELS:
        if level not in points:
            continue
        rec = points[level]
        tests = {
            f"{c['a']} vs {c['b']}": {k: c.get(k) for k in ("diff", "p", "p_holm", "bootstrap_ci95", "b01", "b10")}
            for c in rec["comparisons"]
            if (c["a"], c["b"]) in (PRIMARY, (f"malt{MV}", f"sft-chain{MV}"), (f"malt{MV}", f"chain{MV}"))
        }
        rows.append(
            {
                "v_detect": level[0],
                "v_false_alarm": level[1],
                "model": model_dir(level),
                "pretrain_heldout_loss": pretrain.get(level, {}).get("heldout_loss"),
                "base": skills_line(rec, "chain"),
                "malt": skills_line(rec, "malt"),
                "systems": {k: rec["systems"][k] for k in (PRIMARY[0], PRIMARY[1], f"chain{MV}", f"sft-chain{MV}")},
                "tests": tests,
                "wall_time_s": rec["wall_time_s"],
            }
        )
    return {
        "experiment": "testbed_study_phase",
        "command": command,
        "complete": len(rows) == len(LEVELS),
        "n_eval": N_EVAL,
        "seed": 0,
        "levels": rows,
        "wall_time_s": round(wall, 1),
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
    }


def plot_phase(phase: dict, path: Path) -> None:
    from malt_jax.evaluation.plots import new_figure

    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for key, label, color in (
        ("{} vs {}".format(*PRIMARY), f"MALT{MV} - single{MV}", "C3"),
        (f"{PRIMARY[0]} vs chain{MV}", f"MALT{MV} - untrained chain{MV}", "C0"),
        (f"{PRIMARY[0]} vs sft-chain{MV}", f"MALT{MV} - SFT-chain{MV}", "C2"),
    ):
        pts = [(r["base"]["verifier_balanced_accuracy"], r["tests"].get(key)) for r in phase["levels"]]
        pts = sorted((x, t) for x, t in pts if t is not None and x is not None)
        if not pts:
            continue
        ys = [t["diff"] for _, t in pts]
        err = [
            [y - t["bootstrap_ci95"][0] for y, (_, t) in zip(ys, pts)],
            [t["bootstrap_ci95"][1] - y for y, (_, t) in zip(ys, pts)],
        ]
        ax.errorbar([x for x, _ in pts], ys, yerr=err, marker="o", capsize=3, color=color, label=label)
    ax.axhline(0.0, color="k", linewidth=0.8)
    ax.set_xlabel("base verifier's balanced accuracy (measured, untrained chain)")
    ax.set_ylabel("accuracy gain (95% paired bootstrap)")
    ax.set_title(f"Where MALT pays: testbed, n_eval = {phase['n_eval']}, seed 0")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def run_curve(progress: bool, command: str) -> dict:
    import shutil

    from malt_jax.config import load_run_config
    from malt_jax.workflows.study import run_study

    over = [
        "name=testbed_study_curve",
        "run_dir=runs/testbed_study/curve",
        f"task.num_train={max(TRAIN_SIZES)}",
        f"task.num_eval={N_EVAL}",
        "study.train_sizes=[" + ",".join(map(str, TRAIN_SIZES)) + "]",
        "study.results=runs/testbed_study/curve/results",
        "results=''",
    ]
    cfg = load_run_config(RUN_CONFIG, over)
    out = run_study(cfg, progress=progress, command=command + " (malt-jax study " + " ".join([RUN_CONFIG, *over]) + ")")
    res = ROOT / "runs/testbed_study/curve/results"
    shutil.copyfile(res / "testbed_study_curve.png", ROOT / "results/testbed_study_curve.png")
    return out


def _level(text: str) -> tuple[float, float]:
    try:
        level = tuple(float(x) for x in text.split(","))
    except ValueError:
        level = ()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"--levels: {text!r} is not one of {[f'{a},{b}' for a, b in LEVELS]}")
    return level


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument(
        "--levels",
        nargs="+",
        type=_level,
        default=None,
        help="phase: only these verifier levels, as v_detect,v_false_alarm (default: all of LEVELS)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import os

    os.chdir(ROOT)
    progress = not args.no_progress
    command = "python experiments/testbed_study.py" + (
        "" if args.parts == list(PARTS) else " --parts " + " ".join(args.parts)
    )
    results = ROOT / "results"
    t0 = time.perf_counter()
    records: dict[int, dict] = {}
    if {"seeds", "gr0", "phase"} & set(args.parts):
        ensure_model(DEFAULT_LEVEL, progress)
    if "seeds" in args.parts:
        for s in SEEDS:
            records[s] = run_malt(DEFAULT_LEVEL, s, ablations=True, progress=progress)
            wall = sum(r["wall_time_s"] for r in records.values())
            summary = seeds_summary(records, command, wall)
            (results / "testbed_study.json").write_text(json.dumps(summary, indent=2) + "\n")
            print(f"testbed study: seed {s} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "gr0" in args.parts:
        path = results / "testbed_study.json"
        for s in SEEDS:
            run_gr0(s, progress)
            # the seeds summary is rewritten with the gr0 runs so far, from the seed runs on disk,
            # unless that would drop a seed it holds (its run directory is not on this machine)
            old = json.loads(path.read_text()) if path.exists() else {}
            finished = seed_records()
            missing = sorted(set(old.get("seeds", [])) - set(finished))
            if finished and not missing:
                # the command that ran the seeds stays the summary's (the gr0 record names its own)
                wall = sum(r["wall_time_s"] for r in finished.values())
                summary = seeds_summary(finished, old.get("command", command), wall)
                path.write_text(json.dumps(summary, indent=2) + "\n")
                note = ""
            else:
                note = (
                    f"; {path.name} left as it was: the run directories of its seeds {missing} are not here "
                    "(the seeds part reruns them and then adds the gr0 runs)"
                    if missing
                    else "; no seed run yet: the seeds part adds the gr0 runs to its summary"
                )
            print(f"testbed study: gr0 seed {s} done ({time.perf_counter() - t0:.0f} s){note}", flush=True)
    if "phase" in args.parts:
        points: dict[tuple[float, float], dict] = {}
        pre: dict[tuple[float, float], dict] = {}
        # the new base models first, extremes before the middle; the default level (a rerun of the
        # seeds part's seed 0 on its own model) last
        order = [(0.5, 0.5), (1.0, 0.0), (0.65, 0.35), DEFAULT_LEVEL]
        assert sorted(order) == sorted(LEVELS), (order, LEVELS)
        if args.levels:
            order = [lv for lv in order if lv in args.levels]
        # levels finished before (their runs' summaries) stay in the phase summary
        for level in LEVELS:
            done = ROOT / "runs/testbed_study" / f"{level_tag(level)}_s0" / "summary.json"
            if level not in order and done.exists() and (level == DEFAULT_LEVEL or Path(model_dir(level)).exists()):
                points[level] = json.loads(done.read_text())
                pre[level] = json.loads((ROOT / model_dir(level) / "pretrain.json").read_text())
        for level in order:
            pre[level] = ensure_model(level, progress)
            points[level] = run_malt(level, 0, ablations=level == DEFAULT_LEVEL, progress=progress)
            wall = sum(r["wall_time_s"] for r in points.values()) + sum(
                x.get("wall_time_s", 0.0) for lv, x in pre.items() if lv != DEFAULT_LEVEL
            )
            phase = phase_summary(points, pre, command, wall)
            (results / "testbed_study_phase.json").write_text(json.dumps(phase, indent=2) + "\n")
            plot_phase(phase, results / "testbed_study_phase.png")
            print(f"testbed study: level {level} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "curve" in args.parts:
        from malt_jax.runtime.machine import machine_info

        ensure_model(DEFAULT_LEVEL, progress)
        curve = run_curve(progress, command)
        curve["date"] = datetime.date.today().isoformat()
        curve["machine"] = machine_info()
        (results / "testbed_study_curve.json").write_text(json.dumps(curve, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
