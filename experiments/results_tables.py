"""Markdown tables for the README from the committed JSON summaries under results/.

    python experiments/results_tables.py results/study_synthetic.json
    python experiments/results_tables.py results/study_synthetic_n0400.json

A study curve gives the learning-curve table (one column per training-set size) and the primary
comparison per size; a per-size (or single-run) summary gives the accuracy table, the paired
comparisons (McNemar p and Holm-adjusted p), the held-out training targets and the verifier's
verdict confusion. Numbers are printed as stored, rounded for reading.
"""

from __future__ import annotations

import json
import sys


def _acc(v: dict) -> str:
    return f"{v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def _num(x, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def curve(d: dict) -> None:
    sizes = [c["n_train"] for c in d["curve"]]
    print("| system | " + " | ".join(f"{k} training questions" for k in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, v in d["baselines"].items():
        print(f"| {name} (untrained) | " + " | ".join([_acc(v)] + ["same"] * (len(sizes) - 1)) + " |")
    names = list(dict.fromkeys(n for c in d["curve"] for n in c["systems"]))
    for name in names:
        print(
            f"| {name} | "
            + " | ".join(_acc(c["systems"][name]) if name in c["systems"] else "-" for c in d["curve"])
            + " |"
        )
    print()
    for c in d["curve"]:
        p = c["primary"]
        if p:
            print(
                f"- n_train={c['n_train']}: primary {p['a']} vs {p['b']}: diff {p['diff']:+.3f}, "
                f"McNemar p = {p['p']:.3g}"
            )
    print(
        f"\nwall time {d['wall_time_s'] / 60:.0f} min: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in d["timings_s"].items())
    )


def single(d: dict) -> None:
    print("| system | accuracy [95% Wilson CI] | correct / n |")
    print("|---|---|---|")
    for name, v in d["systems"].items():
        print(f"| {name} | {_acc(v)} | {v['correct']} / {v.get('n', d.get('n_eval'))} |")
    print("\n| comparison | diff | McNemar p | Holm p |")
    print("|---|---|---|---|")
    for c in d["comparisons"]:
        print(
            f"| {c['a']} vs {c['b']}{' (primary)' if c.get('primary') else ''} | {c['diff']:+.3f} | "
            f"{c['p']:.3g} | {'-' if c.get('primary') else format(c['p_holm'], '.3g')} |"
        )
    if "training" in d:
        print("\n| role | held-out SFT loss start -> selected (epoch) | held-out DPO reward accuracy / margin |")
        print("|---|---|---|")
        for role, t in d["training"].items():
            print(
                f"| {role} | {_num(t['heldout_sft_loss_start'])} -> {_num(t['heldout_sft_loss_end'])} "
                f"({t['sft_epochs']}) | {_num(t['heldout_dpo_accuracy'])} / {_num(t['heldout_dpo_margin'], '+.3f')} |"
            )
    if d.get("verifier"):
        print("\n| chain | right: says correct / incorrect | wrong: says correct / incorrect | balanced accuracy |")
        print("|---|---|---|---|")
        for name, c in d["verifier"].items():
            print(
                f"| {name} | {c['right_says_correct']} / {c['right_says_incorrect']} | {c['wrong_says_correct']} / "
                f"{c['wrong_says_incorrect']} | {_num(c['balanced_accuracy'])} |"
            )


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as f:
            d = json.load(f)
        print(f"<!-- {path} -->")
        (curve if "curve" in d else single)(d)
        print()


if __name__ == "__main__":
    main()
