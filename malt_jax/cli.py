"""Command line: ``malt-jax <stage> CONFIG [key=value ...]`` and ``malt-jax chat "question"``.

    malt-jax run experiments/smollm2_synthetic.yaml            # every stage, resumable
    malt-jax expand|credit|train|eval CONFIG [overrides]       # one stage
    malt-jax chat "What is the capital of France?"              # greedy answer of the base model
"""

from __future__ import annotations

import argparse
import json
import sys
import time

STAGES = ("expand", "credit", "train", "eval")


def _cmd_stage(args: argparse.Namespace) -> int:
    from malt_jax.config import load_run_config
    from malt_jax.pipeline import run

    cfg = load_run_config(args.config, args.overrides)
    stages = STAGES if args.command == "run" else (args.command,)
    t0 = time.perf_counter()
    summary = run(cfg, stages=stages, progress=not args.no_progress)
    if "credit" in summary:
        c = summary["credit"]
        print("credit:", json.dumps({k: v for k, v in c.items() if k.endswith(("positive_rate", "/sft", "dpo_pairs"))}))
    if "table" in summary:
        print(summary["table"])
        for row in summary["comparisons"]:
            print(f"{row['target']} vs {row['baseline']}: diff {row['diff']:+.3f}, McNemar p={row['mcnemar_p']:.3g}, "
                  f"bootstrap 95% CI [{row['bootstrap_lo']:+.3f}, {row['bootstrap_hi']:+.3f}]")
        print(f"report: {summary['report']}")
    print(f"done in {time.perf_counter() - t0:.0f} s; run dir {summary['run_dir']}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from malt_jax import sampling
    from malt_jax.config import SamplingConfig
    from malt_jax.pipeline import load_model

    model = load_model(args.weights)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}]
    ids = model.tokenizer.encode_chat(msgs)
    x, n = sampling.pad_batch([ids])
    sc = SamplingConfig(greedy=args.temperature <= 0, temperature=max(args.temperature, 1e-6))
    g = sampling.generate(model.params, jnp.asarray(x), jnp.asarray(n), sampling.row_keys(args.seed, 1),
                          cfg=model.cfg, sampling=sc, stop=sampling.StopCriteria(tuple(model.tokenizer.stop_ids)),
                          max_new_tokens=args.max_new_tokens)
    print(model.tokenizer.decode(sampling.trim(g)[0], skip_special_tokens=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="malt-jax", description="MALT: multi-agent LLM training in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for name in STAGES + ("run",):
        s = sub.add_parser(name, help="all stages" if name == "run" else f"the {name} stage")
        s.add_argument("config", help="YAML experiment config (experiments/*.yaml)")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task.num_train=16")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")
        s.set_defaults(func=_cmd_stage)
    c = sub.add_parser("chat", help="the base model's answer to one question")
    c.add_argument("question")
    c.add_argument("--weights", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    c.add_argument("--system", default="", help="optional system prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    from malt_jax.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"malt-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
