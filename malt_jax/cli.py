"""Command line: ``malt-jax <stage> CONFIG [key=value ...]`` and ``malt-jax chat "question"``.

malt-jax run experiments/smollm2_synthetic.yaml            # every stage, resumable
malt-jax expand|credit|train|eval CONFIG [overrides]       # one stage
malt-jax study experiments/study_synthetic.yaml           # learning curve over training-set sizes
malt-jax rl CONFIG rl.iterations=10 rl.reference=base     # online multi-agent GRPO (the rl section)
malt-jax iterate CONFIG iterate.rounds=3                  # iterative MALT (the iterate section), resumable
malt-jax chat "What is the capital of France?"              # greedy answer of the base model
malt-jax ask RUN_DIR "What is 42 - 17?" --votes 3          # the trained team: 3 G->V->R chains + vote
malt-jax export RUN_DIR OUT --format peft|merged|both      # role adapters for PEFT / transformers
malt-jax plan CONFIG --mesh data=1,fsdp=8,tensor=1 --device v5p   # per-device memory/FLOPs, no hardware
malt-jax pretrain experiments/pretrain/testbed_tiny.yaml         # a small model from scratch -> model dir
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

STAGES = ("expand", "credit", "train", "eval")


def _cmd_stage(args: argparse.Namespace) -> int:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.pipeline import run

    cfg = load_run_config(args.config, args.overrides)
    stages = STAGES if args.command == "run" else (args.command,)
    t0 = time.perf_counter()
    command = " ".join(["malt-jax", args.command, args.config, *args.overrides])
    summary = run(cfg, stages=stages, progress=not args.no_progress, command=command)
    if "credit" in summary:
        c = summary["credit"]
        print("credit:", json.dumps({k: v for k, v in c.items() if k.endswith(("positive_rate", "/sft", "dpo_pairs"))}))
    if "table" in summary:
        print(summary["table"])
        for row in summary["comparisons"]:
            print(
                f"{row['target']} vs {row['baseline']}: diff {row['diff']:+.3f}, McNemar p={row['mcnemar_p']:.3g}, "
                f"bootstrap 95% CI [{row['bootstrap_lo']:+.3f}, {row['bootstrap_hi']:+.3f}]"
            )
        print(f"report: {summary['report']}")
        if "tensorboard" in summary:
            print(f"metrics in TensorBoard: {summary['tensorboard']}")
    print(f"done in {time.perf_counter() - t0:.0f} s; run dir {summary['run_dir']}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.study import run_study

    cfg = load_run_config(args.config, args.overrides)
    command = " ".join(["malt-jax study", args.config, *args.overrides])
    out = run_study(cfg, progress=not args.no_progress, command=command)
    for point in out["curve"]:
        s = point["systems"]
        p = point["primary"] or {}
        print(
            f"n_train={point['n_train']}: "
            + ", ".join(f"{n} {v['accuracy']:.3f}" for n, v in s.items())
            + (f" | primary {p['a']} vs {p['b']}: diff {p['diff']:+.3f}, p={p['p']:.3g}" if p else "")
        )
    print("baselines: " + ", ".join(f"{n} {v['accuracy']:.3f}" for n, v in out["baselines"].items()))
    print(f"wall time {out['wall_time_s']:.0f} s (this call {out['this_call_s']:.0f} s)")
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.rl import run_rl

    cfg = load_run_config(args.config, args.overrides)
    command = " ".join(["malt-jax rl", args.config, *args.overrides])
    s = run_rl(cfg, progress=not args.no_progress, evaluate=not args.no_eval, command=command)
    for role, row in s["last"].items():
        if row is not None:
            print(
                f"{role}: iteration {row['iteration']}: reward_mean {row['reward_mean']:.3f}, loss {row['loss']:.4f}, "
                f"kl {row['kl']:.4f}, clip_ratio {row['clip_ratio']:.3f}"
            )
    points = sorted({(r["iteration"], r["num_tokens"]) for r in s["heldout"]})
    for it, tokens in points:
        scores = ", ".join(
            f"{r['system']} {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            for r in s["heldout"]
            if r["iteration"] == it
        )
        print(f"held-out (validation) after iteration {it}, {tokens:,} tokens: {scores}")
    if "table" in s:
        print(s["table"])
    if "tensorboard" in s:
        print(f"metrics in TensorBoard: {s['tensorboard']}")
    print(
        f"rl: {s['iterations']} iteration(s), {s['num_tokens']:,} tokens sampled (stopped by {s['stopped_by']}); "
        f"metrics {s['metrics']}; run dir {s['run_dir']}"
    )
    return 0


def _cmd_iterate(args: argparse.Namespace) -> int:
    from malt_jax.config import load_run_config
    from malt_jax.workflows.iterate import run_iterative

    cfg = load_run_config(args.config, args.overrides)
    command = " ".join(["malt-jax iterate", args.config, *args.overrides])
    t0 = time.perf_counter()
    s = run_iterative(cfg, progress=not args.no_progress, evaluate=not args.no_eval, command=command)
    state = s["iterate"]
    for rec in state["rounds"]:
        scores = ", ".join(
            f"{n} {v['accuracy']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for n, v in rec["validation"].items()
        )
        print(f"round {rec['round']} (threshold {rec['threshold']:.3f}): validation {scores}")
    print(f"final adapters: round {state['final_round']}; {state['stop_reason']}")
    if "table" in s:
        print(s["table"])
        print(f"report: {s['report']}")
    print(f"done in {time.perf_counter() - t0:.0f} s; run dir {s['run_dir']}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from malt_jax.config import SamplingConfig
    from malt_jax.model.base_model import load_model
    from malt_jax.sampling import decode as sampling
    from malt_jax.workflows.ask import check_question

    check_question(args.question)  # before the model loads
    check_question(args.system, "--system", allow_empty=True)
    model = load_model(args.weights)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.question}
    ]
    ids = model.tokenizer.encode_chat(msgs)
    x, n = sampling.pad_batch([ids])
    sc = SamplingConfig(greedy=args.temperature <= 0, temperature=max(args.temperature, 1e-6))
    g = sampling.generate(
        model.params,
        jnp.asarray(x),
        jnp.asarray(n),
        sampling.row_keys(args.seed, 1),
        cfg=model.cfg,
        sampling=sc,
        stop=sampling.StopCriteria(tuple(model.tokenizer.stop_ids)),
        max_new_tokens=args.max_new_tokens,
    )
    print(model.tokenizer.decode(sampling.trim(g)[0], skip_special_tokens=True))
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from malt_jax.workflows.ask import ask_run, format_turns

    def show(role: str, texts: list[str]) -> None:
        print(format_turns(role, texts), flush=True)

    out = ask_run(
        args.run_dir,
        args.question,
        votes=args.votes,
        temperature=args.temperature,
        base=args.base,
        seed=args.seed,
        on_turn=None if args.json else show,
    )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"answer: {out['answer']} ({out['votes_for']}/{out['votes']} votes"
            f"{', untrained chain' if args.base else ''})"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from malt_jax.workflows.export import export_run

    written = export_run(args.run_dir, args.out, args.format, stage=args.stage)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import math
    import os

    from malt_jax.config import load_run_config
    from malt_jax.planning import units
    from malt_jax.planning.memory import make_plan
    from malt_jax.planning.plan import plan_dict

    overrides = list(args.overrides)
    device, devices = args.device, args.devices
    if args.overlay:
        extra = units.load_overlay(args.overlay).get("plan") or {}
        device = device or extra.get("device")
        devices = devices or extra.get("devices")
        overrides = units.overlay_overrides(args.overlay) + overrides
    cfg = load_run_config(args.config, overrides)
    if args.compile and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # fake enough CPU devices for the AOT check. Importing malt_jax has imported jax already, but
        # XLA reads XLA_FLAGS when jax starts its first backend, which the plan command has not done
        # yet (a device count already in XLA_FLAGS is kept)
        sizes = [v for v in units.parse_mesh(args.mesh or dict(cfg.mesh)).values() if v > 0]
        n = devices or max(1, math.prod(sizes))
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        )
    plan = make_plan(
        cfg,
        mesh=args.mesh,
        devices=devices,
        device=device,
        device_memory=args.device_memory,
        usable=args.usable,
        prompt_tokens=args.prompt_tokens,
        turn_tokens=args.turn_tokens,
        compile=args.compile,
    )
    print(json.dumps(plan_dict(plan), indent=2, default=str) if args.json else plan.table())
    if not plan.fits:
        print(f"malt-jax: {plan.refusal()}", file=sys.stderr)
        return 3
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from malt_jax.training.pretrain import pretrain
    from malt_jax.training.pretrain_config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    command = " ".join(["malt-jax pretrain", args.config, *args.overrides])
    s = pretrain(cfg, progress=not args.no_progress, command=command)
    if s.get("skipped"):
        print(f"{s['out_dir']} is already pretrained with this config (pretrain.json)")
    held = s.get("heldout_loss")
    print(
        f"pretrained {s['n_params']:,} parameters for {s['steps']} steps: train loss {s['train_loss']:.3f}, "
        f"held-out loss {s.get('initial_heldout_loss') or float('nan'):.3f} -> {held or float('nan'):.3f}"
    )
    if s.get("tensorboard"):
        print(f"metrics in TensorBoard: {s['tensorboard']}")
    print(f"model directory: {s['out_dir']} (use it as weights: / --weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="malt-jax", description="MALT: multi-agent LLM training in JAX")
    sub = p.add_subparsers(dest="command", required=True)
    for name in STAGES + ("run",):
        _config_command(
            sub,
            name,
            "all stages" if name == "run" else f"the {name} stage",
            "YAML experiment config (experiments/*.yaml)",
            "task.num_train=16",
            _cmd_stage,
        )
    _config_command(
        sub,
        "study",
        "learning curve: MALT on nested training sets (study.train_sizes)",
        "YAML study config (experiments/study_synthetic.yaml)",
        "study.train_sizes=[8,16]",
        _cmd_study,
    )
    _config_command(
        sub,
        "rl",
        "online multi-agent GRPO of the G/V/R adapters (the config's rl section)",
        "YAML experiment config with an rl section (rl.iterations >= 1)",
        "rl.iterations=10",
        _cmd_rl,
        no_eval=True,
    )
    _config_command(
        sub,
        "iterate",
        "iterative MALT: several rounds, each expanding with the last round's chain",
        "YAML experiment config with an iterate section (iterate.rounds)",
        "iterate.rounds=3",
        _cmd_iterate,
        no_eval=True,
    )
    c = sub.add_parser("chat", help="the base model's answer to one question")
    c.add_argument("question")
    c.add_argument("--weights", default="smollm2", help="'smollm2', a .gguf file or a Hugging Face directory")
    c.add_argument("--system", default="", help="optional system prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_cmd_chat)
    a = sub.add_parser("ask", help="ask a run's trained G->V->R team one question (majority vote of N chains)")
    a.add_argument("run_dir", help="a run directory with trained adapters (runs/<name>)")
    a.add_argument("question")
    a.add_argument("--votes", type=int, default=3, help="number of G->V->R chains (default 3)")
    a.add_argument("--temperature", type=float, default=None, help="default: the run's evaluation temperature")
    a.add_argument("--base", action="store_true", help="the untrained chain (no adapters)")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of streaming the turns")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_cmd_ask)
    e = sub.add_parser("export", help="a run's role adapters as PEFT LoRA folders and/or merged HF checkpoints")
    e.add_argument("run_dir")
    e.add_argument("out", help="output folder (base/, G/, V/, R/ and/or G-merged/ ...)")
    e.add_argument("--format", default="peft", choices=["peft", "merged", "both"])
    e.add_argument("--stage", default="final", choices=["final", "sft"], help="adapters after DPO (final) or SFT")
    e.set_defaults(func=_cmd_export)
    pl = sub.add_parser("plan", help="per-device memory / FLOPs of a config on a mesh (abstract shapes, no hardware)")
    pl.add_argument("config", help="YAML experiment config (experiments/*.yaml)")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=16")
    pl.add_argument("--mesh", default=None, help="data=1,fsdp=8,tensor=1 (default: the config's mesh)")
    pl.add_argument("--devices", type=int, default=None, help="number of devices (default: the mesh's size)")
    pl.add_argument(
        "--device",
        default=None,
        help="device kind for the HBM size: v4, v5e, v5p, v6e, a100, h100, h200 (default v5e, 16 GiB)",
    )
    pl.add_argument("--device-memory", default=None, help="per-device memory, e.g. 16GiB (overrides --device)")
    pl.add_argument("--usable", type=float, default=0.9, help="usable fraction of device memory (default 0.9)")
    pl.add_argument("--overlay", default=None, help="a tpu_configs/*.yaml overlay (mesh, batch sizes, device)")
    pl.add_argument("--prompt-tokens", type=int, default=256, help="question prompt budget for the KV cache")
    pl.add_argument("--turn-tokens", type=int, default=32, help="tokens of each verifier/refiner turn header")
    pl.add_argument(
        "--compile",
        action="store_true",
        help="also AOT-compile a 1-layer sharded SFT step on fake CPU devices and report XLA cost/memory analysis",
    )
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_cmd_plan)
    _config_command(
        sub,
        "pretrain",
        "pretrain a small model from random initialisation -> a model directory",
        "YAML pretrain config (experiments/pretrain/testbed_tiny.yaml)",
        "train.steps=100",
        _cmd_pretrain,
    )
    return p


def _config_command(
    sub: Any, name: str, help: str, config_help: str, example: str, func: Any, no_eval: bool = False
) -> None:
    """A subcommand taking a YAML config and key=value overrides (``--no-progress``, and with
    ``no_eval`` ``--no-eval``)."""
    s = sub.add_parser(name, help=help)
    s.add_argument("config", help=config_help)
    s.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    if no_eval:
        s.add_argument("--no-eval", action="store_true", help="skip the evaluation of the final adapters")
    s.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the `malt-jax` command (not a call from Python): malloc settings first
        from malt_jax.runtime.allocator import reexec

        reexec()
    from malt_jax.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.command != "plan":
        from malt_jax.parallel.distributed import maybe_initialize_from_env

        maybe_initialize_from_env()  # multi-host: MALT_DISTRIBUTED=1 or a TPU pod environment
    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError, FloatingPointError) as e:  # NonFiniteError too
        print(f"malt-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
