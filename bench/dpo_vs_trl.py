"""A LoRA DPO training step: malt-jax ``Stepper("dpo")`` vs TRL ``DPOTrainer`` + peft, one process.

Same model and weights (malt-jax's SmolLM2-135M-Instruct exported with ``save_hf`` and loaded by
transformers), same data (TRL tokenizes the text pairs; malt-jax trains on exactly the token ids
TRL produced, read back from ``trainer.train_dataset``), same LoRA (rank 8, alpha 16, no dropout,
all seven projections q/k/v/o/gate/up/down of every layer), same batch (pairs per step), same
sequence length (every pair is built to ``--seq`` tokens), f32 on both sides, AdamW with
grad-norm clipping 1.0, sigmoid DPO loss with beta 0.2. Reference log-probs are precomputed
once on both sides (malt-jax always does; TRL with ``precompute_ref_log_probs=True``) and are
not part of the timed step. TRL runs with ``gradient_checkpointing=False`` and ``bf16=False``
(its defaults are True/True on a bf16-capable CPU; checkpointing would only add a forward pass).

Timing, interleaved: a ``TrainerCallback`` times each TRL optimizer step from ``on_step_begin``
to ``on_step_end`` (forward + backward + optimizer step of one batch), and in ``on_step_end``
runs and times one malt-jax step on the same batch shape (outside TRL's timed window). So the
two alternate step by step in one process. TRL's steps cycle through the torch thread counts
of ``--threads`` (default 2 and 1: on the shared 2-core VM, two OpenMP threads often lose to
one, see bench/README.md) and the ratio is taken against the faster. The first step of each
thread count (and malt-jax's first step, its compile) is dropped.

malt-jax runs both of its DPO layouts after every TRL step, each from its own state: one row per
pair with the prompt once (``data.pack_dpo_shared``, the library's default) and one row per
completion (``data.pack_dpo``, what TRL computes); the ratio is the default's.

Reported: tokens/s (real tokens of the chosen + rejected rows per step / median step time),
model FLOP/s (of one row per completion) as a fraction of the measured matmul peak in ``--dtype``,
and the ratios.

``--dtype bfloat16`` runs both sides in bf16 mixed precision: TRL with the model loaded in bf16 and
``bf16=True`` (TRL's own default on a CPU with bf16 instructions), malt-jax with ``ModelConfig``
``dtype`` / ``param_dtype`` bfloat16 (its matmuls accumulate in f32, ``llama.lowp_matmul``); the
LoRA weights and AdamW stay f32 on both sides, the reference log-probs come from the bf16 model.

Needs the optional peers env (``make peers``):

    .venv-peers/bin/python bench/dpo_vs_trl.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import common
import flops

import numpy as np

WORDS = (
    "apple river stone cloud green music paper light table water garden window silver "
    "market winter forest summer orange bridge castle doctor engine family friend island "
    "letter monkey number pocket rabbit school sister spring ticket valley yellow animal"
).split()
TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS_OURS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def make_pairs(tok, n: int, seq: int, seed: int = 0) -> list[dict]:
    """``n`` text pairs whose prompt + completion (+ TRL's EOS) is ``seq`` tokens long."""
    rng = np.random.default_rng(seed)
    one = [w for w in WORDS if len(tok.encode(" " + w, add_special_tokens=False)) == 1]
    out = []
    for _ in range(n):
        q = f"What is {rng.integers(1, 50)} plus {rng.integers(1, 50)}? Then list some words."
        prompt = tok.apply_chat_template([{"role": "user", "content": q}])
        p_len = len(tok.encode(prompt, add_special_tokens=False))
        comp = []
        for _ in range(2):
            words = ""
            while True:
                cand = words + " " + one[int(rng.integers(len(one)))]
                if p_len + len(tok.encode(cand, add_special_tokens=False)) + 1 > seq:
                    break
                words = cand
            comp.append(words)
        out.append({"prompt": prompt, "chosen": comp[0], "rejected": comp[1]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 128)")
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed TRL steps per torch thread count (default 4; malt-jax runs one step per TRL step)",
    )
    ap.add_argument(
        "--threads",
        type=str,
        default="2,1",
        help="torch thread counts; TRL steps cycle through them (default 2,1: on a loaded 2-core VM "
        "2 OpenMP threads can be slower than 1, so the ratio uses the faster)",
    )
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="float32 (default): both sides in f32; bfloat16: both sides with bf16 base weights and "
        "bf16 compute (TRL: model loaded in bf16 + bf16=True autocast; malt-jax: ModelConfig dtype and "
        "param_dtype bfloat16), LoRA weights and optimizer in f32 on both",
    )
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    B = args.batch or 2
    seq = args.seq or (64 if args.quick else 128)
    threads = [int(t) for t in args.threads.split(",")]
    steps = args.steps or (1 if args.quick else 4)
    warmup = len(threads)  # the first step of each thread count (and malt-jax's compile) is dropped
    total_steps = warmup + steps * len(threads)

    import jax
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from malt_jax.config import LoraConfig, TrainConfig
    from malt_jax.model.lora import init_lora, lora_scale
    from malt_jax.model.weights import save_hf
    from malt_jax.training.data import DPOExample, pack_dpo, pack_dpo_shared
    from malt_jax.training.role import Stepper, TrainState, make_optimizer, reference_logps

    log = common.log
    model = common.peer_start(
        "LoRA DPO step: malt-jax vs TRL DPOTrainer + peft",
        threads,
        {"transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__},
    )
    cfg, params, tok = model.cfg, model.params, model.tokenizer
    bf16 = args.dtype == "bfloat16"
    peak = flops.measure_peak_jax(1024 if args.quick else 2048, dtype=args.dtype)
    log(f"measured {args.dtype} matmul peak (jax): {peak / 1e9:.1f} GFLOP/s")

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token=tok.decode([tok.eos_id]), pad_token=tok.decode([tok.pad_id])
    )
    tmp = tempfile.TemporaryDirectory()
    save_hf(params, cfg, os.path.join(tmp.name, "model"))
    hf = LlamaForCausalLM.from_pretrained(
        os.path.join(tmp.name, "model"), dtype=torch.bfloat16 if bf16 else torch.float32
    )
    cfg, params = common.in_dtype(cfg, params, args.dtype)  # bf16: the same rounded weights as HF's
    pairs = make_pairs(tok, B * total_steps, seq)
    lr, beta = 5e-5, 0.2
    dcfg = DPOConfig(
        output_dir=os.path.join(tmp.name, "out"),
        use_cpu=True,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        max_steps=total_steps,
        learning_rate=lr,
        beta=beta,
        loss_type=["sigmoid"],
        max_grad_norm=1.0,
        weight_decay=0.0,
        warmup_steps=0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=bf16,
        fp16=False,
        max_length=None,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=B,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS_HF, task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model=hf, args=dcfg, train_dataset=Dataset.from_list(pairs), processing_class=hf_tok, peft_config=lcfg
    )
    log(
        f"TRL trainer built (tokenization) in {time.perf_counter() - t0:.1f}s; trainable params: "
        f"{sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}"
    )

    # malt-jax on exactly TRL's token ids
    ds = trainer.train_dataset
    examples = [
        DPOExample(prompt=list(r["prompt_ids"]), chosen=list(r["chosen_ids"]), rejected=list(r["rejected_ids"]))
        for r in ds
    ]
    lens = [len(e.prompt) + len(c) for e in examples for c in (e.chosen, e.rejected)]
    log(f"pairs: {len(examples)}, row lengths (prompt + completion): min {min(lens)} max {max(lens)}")
    lora_cfg = LoraConfig(rank=8, alpha=16.0, targets=TARGETS_OURS)
    train_cfg = TrainConfig(
        batch_size=B,
        grad_accum=1,
        dpo_beta=beta,
        dpo_loss="sigmoid",
        grad_clip=1.0,
        weight_decay=0.0,
        warmup_ratio=0.0,
        max_seq_len=max(seq, 16),
        dpo_learning_rate=lr,
    )
    opt = make_optimizer(train_cfg, total_steps, lr)
    stepper = Stepper("dpo", cfg, lora_cfg, train_cfg, opt)
    adapter = init_lora(cfg, lora_cfg, jax.random.key(0))
    base, state = stepper.place(params, TrainState.create(adapter, opt))
    ref = reference_logps(base, None, examples, cfg, train_cfg, lora_scale(lora_cfg))
    # both DPO layouts, on the same pairs: one row per pair with the prompt once (the library's
    # default, train.dpo_shared_prompt) and one row per completion (pack_dpo)
    layouts = {"jax": pack_dpo_shared, "jax_rows": pack_dpo}
    batches: dict[str, list] = {k: [] for k in layouts}
    for s in range(total_steps):
        chunk = examples[s * B : (s + 1) * B]
        for k, packer in layouts.items():
            batches[k].append((packer(chunk, train_cfg.max_seq_len), ref[s * B : (s + 1) * B].reshape(-1)))
    log(
        f"malt-jax batch shapes: shared prompt {batches['jax'][0][0]['tokens'].shape}, one row per completion "
        f"{batches['jax_rows'][0][0]['tokens'].shape} (TRL pads each batch to its longest row)"
    )

    times: dict[str, list[float]] = {"trl": [], "jax": [], "jax_rows": [], "trl_threads": []}
    ours: dict[str, Any] = {"state": {k: state for k in layouts}, "k": 0, "loss": [], "loss_rows": []}
    hf_shapes = []

    def our_step():
        for k in layouts:  # both layouts after every TRL step, from their own states
            batch, r = batches[k][ours["k"] % total_steps]
            t = time.perf_counter()
            ours["state"][k], m = stepper(base, ours["state"][k], batch, r)
            times[k].append(time.perf_counter() - t)
            ours["loss" if k == "jax" else "loss_rows"].append(m["loss"])
        ours["k"] += 1

    class Timer(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            torch.set_num_threads(threads[len(times["trl"]) % len(threads)])
            self.t = time.perf_counter()

        def on_step_end(self, a, st, control, **kw):
            times["trl"].append(time.perf_counter() - self.t)
            times["trl_threads"].append(torch.get_num_threads())
            our_step()
            log(
                f"  step {len(times['trl'])}/{total_steps}: TRL ({torch.get_num_threads()} threads) "
                f"{times['trl'][-1]:.2f}s, malt-jax {times['jax'][-1]:.2f}s "
                f"(one row per completion {times['jax_rows'][-1]:.2f}s)"
            )

    orig = trainer.compute_loss

    def spy(model_, inputs, *a, **kw):  # records the padded shape TRL actually runs
        hf_shapes.append(tuple(inputs["input_ids"].shape))
        return orig(model_, inputs, *a, **kw)

    trainer.compute_loss = spy
    trainer.add_callback(Timer())
    t0 = time.perf_counter()
    trainer.train()
    log(
        f"TRL train() incl. reference precompute: {time.perf_counter() - t0:.1f}s; TRL batch shapes: "
        f"{sorted(set(hf_shapes))}"
    )

    peak = max(peak, flops.measure_peak_jax(1024 if args.quick else 2048, dtype=args.dtype))  # best of before/after
    log(f"{args.dtype} matmul peak (jax), best of before/after: {peak / 1e9:.1f} GFLOP/s")
    tj = times["jax"][warmup:]
    tt = {n: [t for t, k in list(zip(times["trl"], times["trl_threads"]))[warmup:] if k == n] for n in threads}
    tokens = sum(lens) / len(examples) * 2 * B  # real tokens per step (chosen + rejected rows)
    rows_lens = lens[: 2 * B]
    # model FLOPs of one row per completion (what TRL computes); the shared-prompt layout computes
    # fewer, so its figures are effective ones
    fl = flops.lora_train_flops(cfg, rows_lens, 8, TARGETS_OURS)
    mj = common.median(tj)
    rows = []
    for name, k in (("malt-jax (shared prompt, default)", "jax"), ("malt-jax (one row per completion)", "jax_rows")):
        mk = common.median(times[k][warmup:])
        rows.append(
            {
                "framework": name,
                "median step s": mk,
                "steps timed": len(times[k][warmup:]),
                "tokens/s": tokens / mk,
                "GFLOP/s": fl / mk / 1e9,
                "% peak FLOP/s": 100 * fl / mk / peak,
            }
        )
    for n in threads:
        mt = common.median(tt[n])
        rows.append(
            {
                "framework": f"TRL + peft, torch {n} thread(s)",
                "median step s": mt,
                "steps timed": len(tt[n]),
                "tokens/s": tokens / mt,
                "GFLOP/s": fl / mt / 1e9,
                "% peak FLOP/s": 100 * fl / mt / peak,
            }
        )
    log(f"\n## LoRA DPO step, {B} pairs x {seq} tokens ({2 * B} rows), {args.dtype}, median of the timed steps")
    log(common.table(rows, list(rows[0].keys())))
    best = min(threads, key=lambda n: common.median(tt[n]))
    ratio = common.median(tt[best]) / mj
    ratio_rows = common.median(tt[best]) / common.median(times["jax_rows"][warmup:])
    log(
        f"malt-jax one row per completion: {ratio_rows:.2f}x TRL; shared prompt vs one row per completion: "
        f"{common.median(times['jax_rows'][warmup:]) / mj:.2f}x"
    )
    log(f"TRL best with {best} torch thread(s); vs {threads[0]} threads: {common.median(tt[threads[0]]) / mj:.2f}x")
    # breakdown: the forward pass alone (the same no-grad pass as the reference log-probs) vs the step
    from malt_jax.training.scoring import batch_logps, batch_rows

    rows0 = batch_rows(batches["jax_rows"][0][0], None)

    def fwd():
        return jax.block_until_ready(batch_logps(base, state.adapter, rows0, cfg=cfg, scale=lora_scale(lora_cfg)))

    fwd()
    tf = common.median([common.timed(fwd) for _ in range(3)])
    fwd_fl = flops.lora_forward_flops(cfg, rows_lens, 8, TARGETS_OURS)
    log(
        f"malt-jax breakdown (one row per completion): forward alone {tf:.2f}s = "
        f"{100 * tf / common.median(times['jax_rows'][warmup:]):.0f}% of the step time "
        f"(forward = {100 * fwd_fl / fl:.0f}% of the step's model FLOPs; forward at "
        f"{100 * fwd_fl / tf / peak:.0f}% of peak)"
    )
    log(
        f"malt-jax losses: {[round(x, 4) for x in ours['loss']]} (mean {np.mean(ours['loss']):.4f}; one row "
        f"per completion: mean {np.mean(ours['loss_rows']):.4f}; TRL logs its mean train_loss above)"
    )
    log(
        f"RATIO LoRA DPO step: malt-jax {ratio:.2f}x TRL (best thread count) "
        f"(target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})"
    )
    log(f"load average at end: {os.getloadavg()}")
    common.save_json(
        args.json,
        {
            "machine": common.machine(),
            "dtype": args.dtype,
            "peak": peak,
            "rows": rows,
            "ratio": ratio,
            "ratio_one_row_per_completion": ratio_rows,
            "times": times,
            "hf_shapes": hf_shapes,
        },
    )
    tmp.cleanup()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
