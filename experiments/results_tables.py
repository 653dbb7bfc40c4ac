"""Markdown blocks for README.md and docs/experiments.md from the committed JSON summaries in results/.

    python experiments/results_tables.py --readme     # the blocks README.md embeds, in its order
    python experiments/results_tables.py --docs       # the blocks docs/experiments.md embeds
    python experiments/results_tables.py results/smollm2-csqa.json   # every table of one summary

Each block is a heading, one line naming the command, the date, the wall time and the machine of
the run that wrote the file, then its tables. tests/test_readme_tables.py checks that README.md
and docs/experiments.md contain every block verbatim, so a table cannot drift from its JSON:
after a re-run, print the blocks again and paste them over the old ones.

The date and the machine come from the summary's own ``date`` and ``machine`` fields
(``machine``: ``{"cpu": ..., "isa": ...}``, as ``malt_jax.runtime.machine`` records it; the
summaries written before the runs recorded it carry the date of their commit and the machine
named in its notes, marked as added afterwards). Numbers are printed as stored, rounded for
reading. Only the standard library is imported (the test must stay fast).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

MAKE = {  # the make target behind a summary's command
    "malt-jax run experiments/testbed.yaml": "make testbed",
    "malt-jax run experiments/smollm2_synthetic.yaml": "make malt",
    "malt-jax run experiments/smollm2_csqa.yaml": "make csqa",
    "malt-jax study experiments/study_synthetic.yaml": "make study",
    "python experiments/testbed_study.py": "make testbed-study",
    "python experiments/testbed_study.py --parts seeds": "make testbed-study ARGS='--parts seeds'",
    "python experiments/testbed_study.py --parts phase": "make testbed-study ARGS='--parts phase'",
    "python experiments/testbed_study.py --parts curve": "make testbed-study ARGS='--parts curve'",
    "python experiments/testbed_study.py --parts seeds gr0": "make testbed-study ARGS='--parts seeds gr0'",
    "python experiments/testbed_rl_compare.py": "make testbed-rl",
    "python experiments/testbed_rl_compare.py --seeds 0": "make testbed-rl ARGS='--seeds 0'",
}
STAGES = {"load": "load", "expand": "expansion", "credit": "credit", "train": "training", "eval": "evaluation"}


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


# ---------------------------------------------------------------- formatting


def _acc(v: dict) -> str:
    return f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _p(x: float) -> str:
    return format(x, ".2g")


def _dur(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m} min {sec} s"
    return f"{m // 60} h {m % 60} min"


def _date(name: str, d: dict) -> str:
    return str(d["date"]).split("T")[0] if d.get("date") else "not recorded in the file"


def _machine(name: str, d: dict) -> str:
    m = d.get("machine")
    if isinstance(m, dict):
        isa = m.get("isa")
        isa = ", ".join(isa) if isinstance(isa, list | tuple) else isa
        return f"{m.get('cpu', 'CPU not recorded')}" + (f" ({isa})" if isa else "")
    return str(m) if m else "not recorded in the file"


def _stage_name(key: str) -> str:
    size, _, stage = key.rpartition("/")
    if size == "eval":  # the study's "eval/baselines"
        return "baseline evaluation"
    return (f"{size} " if size else "") + STAGES.get(stage, stage)


def meta(name: str, d: dict) -> str:
    """One line: command, date, wall time (stage breakdown, peak memory) and machine."""
    cmd = d["command"]
    make = MAKE.get(cmd)
    head = f"Command: `{make}` (`{cmd}`)" if make else f"Command: `{cmd}`"
    if "timings_s" in d:  # a pipeline run: wall_time_s is the sum of its stages' times
        stages = ", ".join(f"{_stage_name(k)} {v:.0f} s" for k, v in d["timings_s"].items() if v >= 1)
        wall = f"wall time {_dur(d['wall_time_s'])}, summed over the stages ({stages})"
    else:
        wall = f"wall time {_dur(d['wall_time_s'])}"
    if d.get("this_call_s") and d["this_call_s"] < d["wall_time_s"]:
        wall += f", in more than one invocation (the last one {_dur(d['this_call_s'])})"
    peak = d.get("peak_rss_gb")
    if peak:
        stage = max(peak, key=peak.get)
        wall += f"; peak resident memory {peak[stage]:.2f} GB (10^9 bytes, {STAGES.get(stage, stage)} stage)"
    return f"{head}; run {_date(name, d)}; {wall}; machine: {_machine(name, d)}. Summary: `results/{name}`."


# ---------------------------------------------------------------- tables


def accuracy_table(d: dict, against: str = "malt+MV@3") -> list[str]:
    """Every system's accuracy, and `against` minus it (exact McNemar p, Holm-adjusted p)."""
    comps = {c["b"]: c for c in d["comparisons"] if c["a"] == against}
    out = [
        f"| system ({d['n_eval']} evaluation questions) | accuracy [95% Wilson CI] | correct / n "
        f"| {against} minus system (McNemar p) |",
        "|---|---|---|---|",
    ]
    for name, v in d["systems"].items():
        c = comps.get(name)
        if c is None:
            cell = ""
        elif c.get("primary"):
            cell = f"{c['diff']:+.3f} (p {_p(c['p'])}, **primary**)"
        else:
            cell = f"{c['diff']:+.3f} (p {_p(c['p'])}, Holm {_p(c['p_holm'])})"
        out.append(f"| {name} | {_acc(v)} | {v['correct']} / {v.get('n', d.get('n_eval'))} | {cell} |")
    return out


def comparisons_table(d: dict) -> list[str]:
    out = ["| comparison | diff | McNemar p | Holm p | paired bootstrap 95% CI |", "|---|---|---|---|---|"]
    for c in d["comparisons"]:
        lo, hi = c["bootstrap_ci95"]
        out.append(
            f"| {c['a']} vs {c['b']}{' (primary)' if c.get('primary') else ''} | {c['diff']:+.3f} | "
            f"{c['p']:.3g} | {'-' if c.get('primary') else format(c['p_holm'], '.3g')} | [{lo:+.3f}, {hi:+.3f}] |"
        )
    return out


def training_table(d: dict) -> list[str]:
    """Per role the held-out figures of epoch selection: measured on the held-out set that chose
    the epochs (so optimistic at the selected epoch), the reward accuracy pair-weighted (with the
    unweighted accurate / all pairs beside it where the summary records them)."""
    out = [
        "| role | SFT examples (train / held out) | selection-set SFT loss start -> selected (epochs) "
        "| DPO pairs (train / held out) | selection-set DPO loss start -> selected (epochs) "
        "| selection-set DPO reward accuracy / margin |",
        "|---|---|---|---|---|---|",
    ]
    for role, t in d["training"].items():
        data = d["training_data"][role]
        out.append(
            f"| {role} | {data['sft']['train_after_cap']} / {data['sft']['heldout']} "
            f"| {_num(t['heldout_sft_loss_start'])} -> {_num(t['heldout_sft_loss_end'])} ({t['sft_epochs']}) "
            f"| {data['dpo']['train_after_cap']} / {data['dpo']['heldout']} "
            f"| {_num(t['heldout_dpo_loss_start'])} -> {_num(t['heldout_dpo_loss_end'])} ({t['dpo_epochs']}) "
            f"| {_dpo_acc(t)} / {_num(t['heldout_dpo_margin'], '+.3f')} |"
        )
    return out


def _dpo_acc(t: dict) -> str:
    """The selected epoch's (pair-weighted) held-out DPO reward accuracy, with the unweighted
    ``k / n`` pairs where the summary has them (summaries from before they were recorded do not)."""
    k, n = t.get("heldout_dpo_accurate_pairs"), t.get("heldout_dpo_pairs")
    return _num(t["heldout_dpo_accuracy"]) + ("" if k is None or n is None else f" ({k} / {n} pairs)")


def _verdicts(v: dict) -> str:
    """A verdict confusion's balanced accuracy (it weights the two classes equally) with the
    unweighted right verdicts / all verdicts beside it."""
    k = v["right_says_correct"] + v["wrong_says_incorrect"]
    return f"{_num(v['balanced_accuracy'])} ({k} / {v['n']} right)"


def verifier_table(verifier: dict, label: str = "chain") -> list[str]:
    out = [
        f"| {label} | G right: V says correct / incorrect / no verdict "
        "| G wrong: V says correct / incorrect / no verdict | V balanced accuracy |",
        "|---|---|---|---|",
    ]
    for name, c in verifier.items():
        out.append(
            f"| {name} | {c['right_says_correct']} / {c['right_says_incorrect']} / {c['right_no_verdict']} "
            f"| {c['wrong_says_correct']} / {c['wrong_says_incorrect']} / {c['wrong_no_verdict']} "
            f"| {_num(c['balanced_accuracy'])} |"
        )
    return out


def skills_table(d: dict) -> list[str]:
    """Each chain's measured role skills (``stages.eval.role_skills``): the untrained chain's are
    the base model's."""
    out = [
        "| chain (every pass of every question) | G accuracy | V balanced accuracy (unweighted verdicts right) "
        "| R fix rate (G wrong -> right) "
        "| R break rate (G right -> wrong) |",
        "|---|---|---|---|---|",
    ]
    for name, s in d.get("skills", {}).items():
        g, v, r = s["generator"], s["verifier"], s["refiner"]
        out.append(
            f"| {name} | {_num(g['accuracy'])} | {_verdicts(v)} "
            f"| {_num(r['fix_rate'])} ({r['fixed']} / {r['g_wrong']}) "
            f"| {_num(r['break_rate'])} ({r['broken']} / {r['g_right']}) |"
        )
    return out


def credit_line(d: dict) -> str:
    c = d["credit"]
    fb = c["reward_fallback"]
    sets = ", ".join(f"{r} {d['training_data'][r]['sft']['examples']}" for r in d["training_data"])
    pairs = ", ".join(
        f"{r} {d['training_data'][r]['dpo']['pairs']}"
        for r in d["training_data"]
        if d["training_data"][r]["dpo"]["pairs"]
    )
    return (
        f"Trees of {c['questions']} training questions: {c['leaf_accuracy']:.1%} correct leaves; the strict reward "
        f"rewarded {fb['rewarded']} of {fb['leaves']} leaves (the lenient grader: {fb['rewarded_lenient']}; "
        f"{fb['cut_off']} cut off by the token budget, {fb['no_explicit_answer']} without an explicit answer). "
        f"SFT examples {sets}; DPO pairs {pairs}."
    )


def study_table(d: dict, sizes: dict[int, dict]) -> list[str]:
    """The learning curve: systems x training-set sizes, and the primary comparison per size."""
    ns = [c["n_train"] for c in d["curve"]]
    out = [
        f"| system ({d['n_eval']} evaluation questions) | " + " | ".join(f"{n} training q." for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name, v in d["baselines"].items():
        out.append(f"| {name} (untrained) | " + " | ".join([_acc(v)] + ["same"] * (len(ns) - 1)) + " |")
    names = list(dict.fromkeys(n for c in d["curve"] for n in c["systems"]))
    for name in sorted(names, key=lambda n: (not n.startswith("sft"), n)):
        cells = [_acc(c["systems"][name]) if name in c["systems"] else "-" for c in d["curve"]]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    prim = [c["primary"] for c in d["curve"]]
    out.append(
        f"| **primary**: {prim[0]['a']} minus {prim[0]['b']} (McNemar p) | "
        + " | ".join(f"{p['diff']:+.3f} (p {_p(p['p'])})" for p in prim)
        + " |"
    )
    return out


def study_comparisons_table(sizes: dict[int, dict]) -> list[str]:
    ns = sorted(sizes)
    rows = [  # the comparisons of the trained chain with a vote, and the two without one
        r
        for r in dict.fromkeys(f"{c['a']} vs {c['b']}" for n in ns for c in sizes[n]["comparisons"])
        if r.startswith("malt+MV@3 vs") or r in ("malt vs chain", "malt vs sft-chain")
    ]
    out = ["| comparison (McNemar p; Holm-adjusted p) | " + " | ".join(f"n={n}" for n in ns) + " |"]
    out.append("|---|" + "---|" * len(ns))
    for row in rows:
        cells = []
        for n in ns:
            c = next((c for c in sizes[n]["comparisons"] if f"{c['a']} vs {c['b']}" == row), None)
            if c is None:
                cells.append("-")
            elif c.get("primary"):
                cells.append(f"{c['diff']:+.3f} (p {_p(c['p'])}, primary)")
            else:
                cells.append(f"{c['diff']:+.3f} (p {_p(c['p'])}, Holm {_p(c['p_holm'])})")
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out


def study_training_table(sizes: dict[int, dict]) -> list[str]:
    out = [
        "| size | role | SFT examples (train / held out) | selection-set SFT loss start -> selected "
        "| DPO pairs (train / held out) | selection-set DPO reward accuracy "
        "| V balanced accuracy (untrained -> trained) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sorted(sizes):
        d = sizes[n]
        for role, t in d["training"].items():
            data = d["training_data"][role]
            v = ""
            if role == "V":
                ver = d["verifier"]
                v = f"{_verdicts(ver['chain'])} -> {_verdicts(ver['malt'])}"
            out.append(
                f"| {n} | {role} | {data['sft']['train_after_cap']} / {data['sft']['heldout']} "
                f"| {_num(t['heldout_sft_loss_start'])} -> {_num(t['heldout_sft_loss_end'])} "
                f"| {data['dpo']['train_after_cap']} / {data['dpo']['heldout']} "
                f"| {_dpo_acc(t)} | {v} |"
            )
    return out


def study_sizes(d: dict) -> dict[int, dict]:
    return {c["n_train"]: load(f"study_synthetic_n{c['n_train']:04d}.json") for c in d["curve"]}


# ---------------------------------------------------------------- blocks


def _block(heading: str, name: str, d: dict, body: list[str]) -> str:
    return "\n".join([heading, "", meta(name, d), "", *body])


def _run_block(heading: str, name: str, full: bool) -> str:
    """A MALT run's block: its accuracies; ``full``: also its credit, comparisons, training and
    verifier tables."""
    d = load(name)
    body = accuracy_table(d)
    if full:
        body += ["", credit_line(d), "", *comparisons_table(d), "", *training_table(d), ""]
        body += verifier_table(d["verifier"])
    return _block(heading, name, d, body)


def block_testbed(full: bool = False) -> str:
    """MALT on the model pretrained by malt-jax (its pretraining summary beside it)."""
    d = load("testbed.json")
    pre = load("testbed_pretrain.json")
    body = accuracy_table(d) + ["", *skills_table(d), ""]
    body.append(
        f"Base model: {pre['n_params']:,} parameters pretrained from random weights for {pre['steps']} steps "
        f"({pre['tokens']:,} tokens, held-out loss {pre['initial_heldout_loss']:.2f} -> {pre['heldout_loss']:.3f}) "
        f"in {_dur(pre['wall_time_s'])} at {pre['tokens_per_s']:,.0f} tokens/s on {_machine('', pre)} "
        f"(`{pre['command']}`; `results/testbed_pretrain.json`)."
    )
    if full:
        body += ["", credit_line(d), "", *comparisons_table(d), "", *training_table(d), ""]
        body += verifier_table(d["verifier"])
    return _block(
        "### `make testbed`: a model pretrained from scratch, subtraction checked by addition", "testbed.json", d, body
    )


def block_malt(full: bool = False) -> str:
    heading = "### `make malt`: SmolLM2-135M-Instruct, synthetic inverse arithmetic"
    return _run_block(heading, "smollm2-synthetic.json", full)


def block_csqa(full: bool = False) -> str:
    return _run_block("### `make csqa`: SmolLM2-135M-Instruct, CommonsenseQA", "smollm2-csqa.json", full)


def block_study(full: bool = False) -> str:
    d = load("study_synthetic.json")
    sizes = study_sizes(d)
    body = study_table(d, sizes)
    if (RESULTS / "study_synthetic.png").exists():
        body += ["", f"![learning curve]({'../' if full else ''}results/study_synthetic.png)"]  # docs/ is a level down
    if full:
        per_size = "; ".join(
            f"`results/study_synthetic_n{n:04d}.json` ({_dur(sizes[n]['wall_time_s'])})" for n in sorted(sizes)
        )
        body += ["", f"Per size (wall time of its training and evaluation): {per_size}.", ""]
        body += study_comparisons_table(sizes) + [""] + study_training_table(sizes)
    return _block("### `make study`: learning curve, synthetic inverse arithmetic", "study_synthetic.json", d, body)


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def pooled_table(pooled: dict, same_sign: bool) -> list[str]:
    """Comparisons pooled over seeds (``evaluation.stats.seeds_paired_test`` records, Holm p)."""
    out = [
        "| comparison (pooled over seeds) | diff [95% CI] | per seed | p (sign-flip over questions) | Holm p "
        "| discordant (a only / b only) |" + (" same sign every seed |" if same_sign else ""),
        "|---|---|---|---|---|---|" + ("---|" if same_sign else ""),
    ]
    for k, c in pooled.items():
        holm = "**primary**" if c.get("primary") else _p(c["p_holm"])
        out.append(
            f"| {k} | {c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
            + ", ".join(f"{x:+.3f}" for x in c["diffs"])
            + f" | {_p(c['p_value'])} | {holm} | {c['b10']} / {c['b01']} |"
            + (f" {'yes' if c['same_sign_every_seed'] else 'no'} |" if same_sign else "")
        )
    return out


def testbed_seeds_tables(d: dict) -> list[str]:
    """Per-seed accuracies (mean +- SD over seeds), the comparisons pooled over seeds, the skills."""
    seeds = [str(s) for s in d["seeds"]]
    per = d["per_seed"]
    names = list(per[seeds[0]]["systems"])
    out = [
        f"| system ({d['n_eval']} evaluation questions, {d['n_train']} training) | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean +- SD |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for n in names:
        accs = [per[s]["systems"][n]["accuracy"] for s in seeds if n in per[s]["systems"]]
        out.append(
            f"| {n} | "
            + " | ".join(f"{per[s]['systems'][n]['accuracy']:.3f}" if n in per[s]["systems"] else "" for s in seeds)
            + f" | {sum(accs) / len(accs):.3f} +- {_sd(accs):.3f} |"
        )
    out += ["", *pooled_table(d["pooled"], same_sign=True)]
    gr0 = d.get("gr0")  # the gr0 part's runs (G and R trained with an empty critique), once there are any
    if gr0:
        out += [
            "",
            f"{gr0['system']}: G and R trained with an empty critique (`tree.critique: false`, "
            f"{', '.join(f'`{o}`' for o in gr0['overrides'][1:])}), a run of its own per seed "
            f"(seeds {', '.join(map(str, gr0['seeds']))}"
            + ("" if gr0["complete"] else ", incomplete")
            + f"), evaluated as G -> (no critique) -> R; its comparisons with MALT ({'; '.join(gr0['holm_family'])}) "
            "are a Holm family of their own.",
        ]
    out += [
        "",
        "| role skill (mean over seeds, every pass) | G accuracy | V balanced accuracy | R fix rate | R break rate |",
        "|---|---|---|---|---|",
    ]
    gr0_skills = (gr0["system"],) if gr0 and all(gr0["system"] in per[s]["skills"] for s in seeds) else ()
    for chain in ("chain", "sft-chain", "malt", *gr0_skills):
        vals = [per[s]["skills"][chain] for s in seeds]
        cells = []
        for key in ("generator_accuracy", "verifier_balanced_accuracy", "refiner_fix_rate", "refiner_break_rate"):
            xs = [v[key] for v in vals if v.get(key) is not None]
            cells.append(f"{sum(xs) / len(xs):.3f}" if xs else "n/a")
        out.append(f"| {chain} | " + " | ".join(cells) + " |")
    t = d["targets"]
    out += [
        "",
        "Targets: MALT+MV@3 beats single+MV@3, chain+MV@3 and SFT-chain+MV@3 (Holm p < 0.05 pooled, same sign "
        f"in every seed): {'met' if t['beats_single_chain_sftchain_mv'] else 'not met'}; trained V's balanced "
        f"accuracy minus the untrained V's {t['verifier_balanced_accuracy_gain']:+.3f} (target >= +0.10: "
        f"{'met' if t['verifier_gain_at_least_0.10'] else 'not met'}); R's fix rate "
        f"{_num(t['refiner_fix_rate']['base'])} -> {_num(t['refiner_fix_rate']['malt'])}, break rate "
        f"{_num(t['refiner_break_rate']['base'])} -> {_num(t['refiner_break_rate']['malt'])}."
        + ("" if d.get("complete") else f" (Incomplete: {len(seeds)} of 3 seeds so far.)"),
    ]
    return out


def testbed_phase_table(d: dict) -> list[str]:
    key, chain, sft = "malt+MV@3 vs single+MV@3", "malt+MV@3 vs chain+MV@3", "malt+MV@3 vs sft-chain+MV@3"
    out = [
        f"| corpus v_detect / v_false_alarm | base V balanced accuracy (measured) | base G accuracy | "
        f"MALT V balanced accuracy | {key} (p) | {chain} (Holm p) | {sft} (Holm p) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["levels"]:
        a, c, b = r["tests"].get(key), r["tests"].get(chain), r["tests"].get(sft)
        out.append(
            f"| {r['v_detect']} / {r['v_false_alarm']} | {_num(r['base']['verifier_balanced_accuracy'])} | "
            f"{_num(r['base']['generator_accuracy'])} | {_num(r['malt']['verifier_balanced_accuracy'])} | "
            + (f"{a['diff']:+.3f} ({_p(a['p'])})" if a else "")
            + " | "
            + (f"{c['diff']:+.3f} ({_p(c['p_holm'])})" if c else "")
            + " | "
            + (f"{b['diff']:+.3f} ({_p(b['p_holm'])})" if b else "")
            + " |"
        )
    if not d.get("complete"):
        out += ["", f"(Incomplete: {len(d['levels'])} of 4 levels so far.)"]
    return out


def testbed_curve_table(d: dict) -> list[str]:
    out = study_table(d, {})
    if not d.get("complete", True):
        out += ["", "(Incomplete: the sizes above so far.)"]
    return out


def block_testbed_study(full: bool = False) -> str:
    d = load("testbed_study.json")
    body = testbed_seeds_tables(d)
    for name, label, render in (
        ("testbed_study_phase.json", "Phase diagram (seed 0; one base model per verifier level)", testbed_phase_table),
        ("testbed_study_curve.json", "Learning curve (seed 0; nested training sets)", testbed_curve_table),
    ):
        if (RESULTS / name).exists():
            ph = load(name)
            body += ["", f"{label}: {meta(name, ph)}", "", *render(ph)]
            png = name.replace(".json", ".png")
            if (RESULTS / png).exists():
                alt = "phase diagram" if "phase" in name else "learning curve"
                body += ["", f"![{alt}]({'../' if full else ''}results/{png})"]
    return _block("### `make testbed-study`: seeds, role ablations and where MALT pays", "testbed_study.json", d, body)


def testbed_rl_tables(d: dict) -> list[str]:
    """Accuracy and sampled tokens per method and seed, the comparisons pooled over seeds."""
    seeds = [str(s) for s in d["seeds"]]
    per = d["per_seed"]
    out = [
        f"| method (system; {d['n_eval']} evaluation questions) | "
        + " | ".join(f"seed {s}: accuracy (sampled tokens)" for s in seeds)
        + " | mean +- SD |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for m, acc in d["accuracy"].items():
        system = d["systems"].get(m, "single+MV@3, untrained")
        cells = []
        for s in seeds:
            a, tok = per[s]["accuracy"].get(m), per[s]["tokens"].get(m)
            cells.append("" if a is None else f"{a:.3f}" + (f" ({tok:,})" if tok else ""))
        sd = "" if acc["sd"] is None else f" +- {acc['sd']:.3f}"
        out.append(f"| {m} ({system}) | " + " | ".join(cells) + f" | {acc['mean']:.3f}{sd} |")
    out += ["", *pooled_table(d["pooled"], same_sign=False)]
    t = d["targets"]
    out += [
        "",
        "Target (online multi-agent GRPO beats offline MALT and single-agent GRPO+MV@3, Holm p < 0.05): "
        + ", ".join(f"{k}: {'met' if v else 'not met'}" for k, v in t.items())
        + ("." if d.get("complete") else f" (Incomplete: seeds {', '.join(seeds)} of 0, 1, 2 so far.)"),
    ]
    return out


def block_testbed_rl(full: bool = False) -> str:
    d = load("testbed_rl_compare.json")
    body = testbed_rl_tables(d)
    if (RESULTS / "testbed_rl_compare.png").exists():
        body += ["", f"![reward against sampled tokens]({'../' if full else ''}results/testbed_rl_compare.png)"]
    return _block(
        "### `make testbed-rl`: offline MALT, iterative MALT, online multi-agent GRPO, single-agent GRPO",
        "testbed_rl_compare.json",
        d,
        body,
    )


def block_testbed_plain_dpo() -> str:
    """The declared study's first seed with plain DPO (the recipe before the validation choice)."""
    d = load("testbed_study_plain_dpo.json")
    body = testbed_seeds_tables(d) + ["", d["note"]]
    return _block(
        "### Testbed study, first seed with plain DPO (superseded recipe)", "testbed_study_plain_dpo.json", d, body
    )


def block_testbed_rpo_validation() -> str:
    """Plain DPO vs DPO + NLL (RPO) on the testbed's validation questions."""
    d = load("testbed_rpo_validation.json")
    names = ["single+MV@3", "chain+MV@3", "sft-chain+MV@3", "malt", "malt+MV@3"]
    out = [
        f"| recipe ({d['n_eval']} {d['split']} questions) | " + " | ".join(names) + " | MALT R fix / break rate |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for name, v in d["variants"].items():
        r = v["skills"]["malt"]["refiner"]
        cells = [f"{v['systems'][n]['accuracy']:.3f}" for n in names]
        out.append(
            f"| {name} (rpo_alpha {v['rpo_alpha']}) | "
            + " | ".join(cells)
            + f" | {r['fix_rate']:.3f} / {r['break_rate']:.3f} |"
        )
    return _block("### Testbed DPO recipe (validation questions)", "testbed_rpo_validation.json", d, out)


def block_probe_verification() -> str:
    d = load("probe_verification.json")
    body = [
        f'| family ({d["items"]} items each) | solve accuracy | verify AUC | says "correct" |',
        "|---|---|---|---|",
    ]
    for fam, v in d["families"].items():
        body.append(f"| {fam} | {v['solve_accuracy']:.3f} | {v['verify_auc']:.3f} | {v['says_correct']:.3f} |")
    return _block("### Can SmolLM2-135M verify at all?", "probe_verification.json", d, body)


def block_verifier_designs() -> str:
    d = load("probe_verifier_designs.json")
    body = [
        f"| design @ tree temperature ({d['n']} {d['split']} questions, {d['framing']} framing) "
        '| G accuracy | R accuracy | V balanced accuracy (unweighted verdicts right) | V says "correct" |',
        "|---|---|---|---|---|",
    ]
    for run, v in d["runs"].items():
        body.append(
            f"| {run} | {v['G_accuracy']:.3f} | {v['R_accuracy']:.3f} | {_verdicts(v['verdicts'])} "
            f"| {v['verdicts']['says_correct_rate']:.3f} |"
        )
    return _block("### Verifier designs", "probe_verifier_designs.json", d, body)


def block_framing() -> str:
    d = load("framing_synthetic.json")
    systems = list(next(iter(d["framings"].values()))["systems"])
    body = [
        f"| framing ({d['n_eval']} {d['split']} questions) | "
        + " | ".join(systems)
        + " | V balanced accuracy (unweighted verdicts right) |",
        "|---|" + "---|" * (len(systems) + 1),
    ]
    for name, f in d["framings"].items():
        cells = [f"{f['systems'][s]['accuracy']:.3f}" for s in systems]
        body.append(f"| {name} | " + " | ".join(cells) + f" | {_verdicts(f['verifier'])} |")
    body.append("")
    body.append(
        "Separate vs chat: "
        + "; ".join(f"{c['a']} minus {c['b']} {c['diff']:+.3f} (McNemar p {_p(c['p'])})" for c in d["separate_vs_chat"])
        + "."
    )
    return _block("### Role framing", "framing_synthetic.json", d, body)


def _study_blocks(full: bool) -> list[str]:
    out = [block_testbed_study(full)] if (RESULTS / "testbed_study.json").exists() else []
    return out + ([block_testbed_rl(full)] if (RESULTS / "testbed_rl_compare.json").exists() else [])


def _testbed_recipe_blocks() -> list[str]:
    return [block_testbed_rpo_validation(), block_testbed_plain_dpo()]


def readme_blocks() -> list[str]:
    return [block_testbed(), *_study_blocks(False), block_malt(), block_csqa(), block_study()]


def docs_blocks() -> list[str]:
    return [
        block_probe_verification(),
        block_verifier_designs(),
        block_framing(),
        block_testbed(full=True),
        *_study_blocks(True),
        *_testbed_recipe_blocks(),
        block_malt(full=True),
        block_csqa(full=True),
        block_study(full=True),
    ]


def file_block(path: str) -> str:
    name = Path(path).name
    by_file = {
        "testbed.json": lambda: block_testbed(full=True),
        "testbed_pretrain.json": lambda: block_testbed(full=True),
        "testbed_study.json": lambda: block_testbed_study(full=True),
        "testbed_study_phase.json": lambda: block_testbed_study(full=True),
        "testbed_study_curve.json": lambda: block_testbed_study(full=True),
        "testbed_study_plain_dpo.json": block_testbed_plain_dpo,
        "testbed_rl_compare.json": lambda: block_testbed_rl(full=True),
        "testbed_rpo_validation.json": block_testbed_rpo_validation,
        "smollm2-synthetic.json": lambda: block_malt(full=True),
        "smollm2-csqa.json": lambda: block_csqa(full=True),
        "study_synthetic.json": lambda: block_study(full=True),
        "probe_verification.json": block_probe_verification,
        "probe_verifier_designs.json": block_verifier_designs,
        "framing_synthetic.json": block_framing,
    }
    if name in by_file and Path(path).resolve() == (RESULTS / name).resolve():
        return by_file[name]()
    d = json.loads(Path(path).read_text())  # any other single-run summary (e.g. a run directory's)
    body = accuracy_table(d)
    if "training" in d:
        body += ["", *comparisons_table(d), "", *training_table(d)]
    if d.get("verifier"):
        body += ["", *verifier_table(d["verifier"])]
    return _block(f"### {d.get('experiment', name)}", name, d, body)


def main(argv: list[str]) -> None:
    if argv == ["--readme"]:
        blocks = readme_blocks()
    elif argv == ["--docs"]:
        blocks = docs_blocks()
    elif argv and not any(a.startswith("--") for a in argv):
        blocks = [file_block(a) for a in argv]
    else:
        sys.exit(__doc__)
    print("\n\n".join(blocks))


if __name__ == "__main__":
    main(sys.argv[1:])
