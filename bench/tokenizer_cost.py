"""What a tokenizer costs a small pretrained model: the LM head's share of the parameters and of a
training step's FLOPs, and tokens per typical G -> V -> R trace, for SmolLM2's 49,152-token
vocabulary against small BPE vocabularies trained on the traces (``model/small_tokenizer.py``).

    .venv/bin/python bench/tokenizer_cost.py [--json PATH] [--seq-len 512]

The traces are the synthetic task's questions in the pipeline's own chat framing (system prompt,
question, a generator answer, the verifier's prompt and critique, the refiner's prompt and final
answer), rendered with each tokenizer's ChatML template. FLOPs follow ``planning/flops.py``: a
training step is 3x the forward pass; the head (tied to the embedding) costs ``2 * vocab * dim``
per token and pass, the embedding lookup none.
"""

from __future__ import annotations

import argparse
import json
import random

from malt_jax.config import ModelConfig
from malt_jax.model.files import smollm2_gguf_path
from malt_jax.model.small_tokenizer import train_tokenizer
from malt_jax.model.tokenizer import load_tokenizer
from malt_jax.planning.flops import forward_flops
from malt_jax.tasks import get_task, role_messages


def traces(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """``n`` G -> V -> R conversations on synthetic questions (answers made up, right or wrong)."""
    rng = random.Random(seed)
    task = get_task("synthetic", seed=seed)
    prompts = task.prompts
    out = []
    for ex in task.load("train")[:n]:
        wrong = rng.random() < 0.5
        gold = str(ex.answer)
        g_ans = str(int(gold) + rng.choice([-2, -1, 1, 2])) if wrong and gold.lstrip("-").isdigit() else gold
        expr = ex.meta.get("expression", "")
        g = f"Let me compute step by step: {expr} = {g_ans}.\nAnswer: {g_ans}"
        v = "The computation has an error; the result should be checked again." if wrong else "Each step is correct."
        r = f"Rechecking the steps, the result is {gold}.\nAnswer: {gold}"
        msgs = role_messages(prompts, "refiner", ex.question, g, v)
        out.append(msgs + [{"role": "assistant", "content": r}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--traces", type=int, default=200)
    args = ap.parse_args()
    convs = traces(args.traces)
    smol = load_tokenizer(smollm2_gguf_path())
    texts = [smol.apply_chat_template(c, add_generation_prompt=False) for c in convs]
    toks = {"smollm2-49152": smol}
    for kind, vocab in (("bytelevel", 512), ("bytelevel", 384), ("char", 256), ("char", 128)):
        toks[f"{kind}-{vocab}"] = train_tokenizer(texts[: args.traces // 2], vocab, kind=kind)  # type: ignore[arg-type]
    held = convs[args.traces // 2 :]
    rows = []
    T = args.seq_len
    for width, ffn in ((128, 512), (256, 1024)):
        for name, tok in toks.items():
            cfg = ModelConfig.tiny(
                vocab_size=tok.vocab_size,
                dim=width,
                n_layers=4,
                n_heads=4,
                n_kv_heads=2,
                head_dim=width // 4,
                hidden_dim=ffn,
            )
            lens = [len(tok.encode_chat(c, add_generation_prompt=False)) for c in held]
            head = cfg.vocab_size * cfg.dim
            pairs = T * (T + 1) / 2  # one row of T tokens, causal
            step = 3 * forward_flops(cfg, T, pairs)
            head_flops = 3 * 2 * head * T
            per_trace = sum(lens) / len(lens)
            rows.append(
                {
                    "dim": width,
                    "tokenizer": name,
                    "vocab": cfg.vocab_size,
                    "params": cfg.n_params,
                    "head_params_share": head / cfg.n_params,
                    "step_flops_per_token": step / T,
                    "head_flops_share": head_flops / step,
                    "tokens_per_trace": per_trace,
                    "chars_per_token": sum(len(tok.apply_chat_template(c, add_generation_prompt=False)) for c in held)
                    / sum(lens),
                    # training FLOPs to read one trace (the cost that decides the choice)
                    "mflops_per_trace": step / T * per_trace / 1e6,
                }
            )
    header = (
        f"{'dim':>4} {'tokenizer':<14} {'params':>10} {'head %params':>12} {'head %FLOPs':>11} "
        f"{'tok/trace':>9} {'chars/tok':>9} {'MFLOP/trace':>11}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['dim']:>4} {r['tokenizer']:<14} {r['params']:>10,} {100 * r['head_params_share']:>11.1f}% "
            f"{100 * r['head_flops_share']:>10.1f}% {r['tokens_per_trace']:>9.0f} {r['chars_per_token']:>9.2f} "
            f"{r['mflops_per_trace']:>11.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq_len": T, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
