"""The MALT pipeline as resumable stages over one run directory.

    expand  -> <run>/expansion/batch_*.npz (+ .jsonl texts)   trees of G/V/R samples and leaf rewards
    credit  -> <run>/credit/{G,V,R}_{sft,dpo}.jsonl, summary.json
    train   -> <run>/adapters/{G,V,R}/                        one LoRA adapter per role (orbax)
    eval    -> <run>/eval/<system>.jsonl, report.md, *.png

Every stage skips work whose output already exists, so an interrupted run resumes where it
stopped (expansion per question batch, training per checkpoint, evaluation per system).
Stages talk through these files and the public functions below, never through globals.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax import credit as credit_lib
from malt_jax.config import ModelConfig, RunConfig, to_dict
from malt_jax.expansion import ExpansionSpec, expand
from malt_jax.model.llama import Params, init_params
from malt_jax.model.tokenizer import Tokenizer
from malt_jax.sampling import StopCriteria, pad_batch
from malt_jax.tasks import Example, Task, role_messages

ROLES = ("G", "V", "R")
ROLE_NAMES = {"G": "generator", "V": "verifier", "R": "refiner"}


# ----------------------------------------------------------------------------------------------
# model + prompts


@dataclasses.dataclass
class Model:
    params: Params
    cfg: ModelConfig
    tokenizer: Tokenizer


def load_model(weights: str = "smollm2", cfg: ModelConfig | None = None, seed: int = 0) -> Model:
    """Loads the base model and its tokenizer.

    ``weights``: ``"smollm2"`` (embedded default), a ``.gguf`` file, a Hugging Face directory,
    or ``"random"`` (random weights of ``cfg``, with the SmolLM2 tokenizer; for tests).
    """
    from malt_jax.model.files import smollm2_gguf_path
    from malt_jax.model.tokenizer import load_tokenizer
    from malt_jax.model.weights import load_weights

    if weights == "random":
        tok = load_tokenizer(smollm2_gguf_path())
        cfg = dataclasses.replace(cfg or ModelConfig.tiny(), vocab_size=tok.vocab_size)
        return Model(init_params(cfg, jax.random.key(seed)), cfg, tok)
    src = smollm2_gguf_path() if weights == "smollm2" else Path(weights)
    params, loaded = load_weights(src, None)
    if cfg is not None:  # shapes come from the checkpoint, runtime choices from the config
        loaded = dataclasses.replace(loaded, dtype=cfg.dtype, remat=cfg.remat)
    return Model(params, loaded, load_tokenizer(src))


@dataclasses.dataclass(frozen=True)
class PromptCodec:
    """Token-level rendering of the G -> V -> R conversation of a task.

    The roles share one chat, so the verifier context is ``question_tokens + g + turns[0]``
    and the refiner context ``... + v + turns[1]``: the turn tokens are constant.
    """

    tokenizer: Tokenizer
    task: Task

    def question(self, q: str) -> list[int]:
        return self.tokenizer.encode_chat(role_messages(self.task.prompts, "G", q))

    @property
    def turns(self) -> tuple[list[int], list[int]]:
        tok, p = self.tokenizer, self.task.prompts
        q, g, v = "QUESTION", "\x00GEN\x00", "\x00VER\x00"
        s_g = tok.apply_chat_template(role_messages(p, "G", q))
        s_v = tok.apply_chat_template(role_messages(p, "V", q, generator_out=g))
        s_r = tok.apply_chat_template(role_messages(p, "R", q, generator_out=g, verifier_out=v))
        if not (s_v.startswith(s_g + g) and s_r.startswith(s_v + v)):
            raise ValueError("the chat template does not render the G -> V -> R roles as one growing "
                             "conversation; prefix sharing needs that (check the task's prompts)")
        return tok.encode(s_v[len(s_g) + len(g):]), tok.encode(s_r[len(s_v) + len(v):])

    @property
    def stop(self) -> StopCriteria:
        return StopCriteria(stop_ids=tuple(self.tokenizer.stop_ids))

    @property
    def end_of_turn(self) -> int:
        """Token appended to a completion that stopped by itself (the first turn token)."""
        return self.turns[0][0]


# ----------------------------------------------------------------------------------------------
# expansion


def question_keys(seed: int, indices: Sequence[int]) -> jax.Array:
    """Per-question keys that depend only on (seed, question index), not on batching."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.int32))


def sample_trees(
    model: Model,
    codec: PromptCodec,
    examples: Sequence[Example],
    spec: ExpansionSpec,
    *,
    seed: int,
    batch_size: int,
    adapters: tuple[Params | None, ...] = (None, None, None),
    lora_scale: float = 1.0,
    on_batch: Callable[[int, dict], None] | None = None,
    skip: Callable[[int], bool] = lambda b: False,
    desc: str = "expand",
    progress: bool = True,
    mesh=None,
) -> None:
    """Samples trees for ``examples`` in batches of ``batch_size`` questions.

    Every batch is padded to ``batch_size`` questions and one prompt width, so the whole
    stage compiles once. ``on_batch(index, arrays)`` receives host arrays per batch. With a
    ``mesh``, the question batch (rounded up to a multiple of the data-parallel size) is split
    over the ``data``/``fsdp`` axes and every tree row is sampled on its question's device.
    """
    from tqdm.auto import tqdm

    from malt_jax.sharding import shard_batch

    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp

    q_ids = [codec.question(e.question) for e in examples]
    width = -(-max(len(q) for q in q_ids) // 32) * 32
    turns = tuple(jnp.asarray(t, jnp.int32) for t in codec.turns)
    n_batches = -(-len(examples) // batch_size)
    todo = [b for b in range(n_batches) if not skip(b)]
    bar = tqdm(total=len(todo) * batch_size, desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for b in todo:
        lo, hi = b * batch_size, min(len(examples), (b + 1) * batch_size)
        idx = list(range(lo, hi)) + [lo] * (batch_size - (hi - lo))  # pad with copies, dropped below
        x, lens = pad_batch([q_ids[i] for i in idx], bucket=width)
        t0 = time.perf_counter()
        inputs = (jnp.asarray(x), jnp.asarray(lens), question_keys(seed, idx))
        if mesh is not None:
            inputs = shard_batch(inputs, mesh)
        tree = expand(model.params, tuple(adapters), inputs[0], inputs[1], turns, inputs[2],
                      cfg=model.cfg, spec=spec, lora_scale=lora_scale)
        tree = jax.device_get(tree)
        dt = time.perf_counter() - t0
        k = hi - lo
        arrays = {"index": np.arange(lo, hi), "q_tokens": x[:k], "q_lens": lens[:k]}
        for level, role in enumerate(ROLES[: spec.depth]):
            arrays[f"{role}_tokens"] = np.asarray(tree.tokens[level])[:k]
            arrays[f"{role}_lengths"] = np.asarray(tree.lengths[level])[:k]
            arrays[f"{role}_logps"] = np.asarray(tree.logps[level])[:k]
            arrays[f"{role}_stopped"] = np.asarray(tree.stopped[level])[:k]
        n_tok = sum(int(np.asarray(tree.lengths[i]).sum()) for i in range(spec.depth))
        bar.set_postfix(tok_s=f"{n_tok / dt:.0f}")
        bar.update(batch_size)
        if on_batch:
            on_batch(b, arrays)
    bar.close()


def decode_level(tokenizer: Tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Object array of texts shaped like ``lengths``."""
    flat_t = tokens.reshape(-1, tokens.shape[-1])
    flat_l = lengths.reshape(-1)
    out = np.empty(flat_l.shape[0], dtype=object)
    for i in range(flat_l.shape[0]):
        out[i] = tokenizer.decode(flat_t[i, : flat_l[i]].tolist(), skip_special_tokens=True)
    return out.reshape(lengths.shape)


def grade_leaves(task: Task, examples: Sequence[Example], texts: np.ndarray) -> np.ndarray:
    """Rewards [Q, ...] of the final-role texts [Q, ...] against each question's gold."""
    rewards = np.zeros(texts.shape, np.float32)
    for q, ex in enumerate(examples):
        for idx in np.ndindex(texts.shape[1:]):
            rewards[(q,) + idx] = task.grade_example(texts[(q,) + idx], ex)
    return rewards


def expansion_spec(cfg: RunConfig, **kw: Any) -> ExpansionSpec:
    t, s = cfg.tree, cfg.sampling
    base = dict(n=t.n, m=t.m, l=t.l, max_new=(s.max_new_tokens,) * 3, sampling=s,
                mode="extend" if t.share_prefix else "naive")
    base.update(kw)
    return ExpansionSpec(**base)


def run_expand(cfg: RunConfig, model: Model, task: Task, train: Sequence[Example], run_dir: Path,
               progress: bool = True, mesh=None) -> Path:
    """Stage 1: trajectory expansion of the training questions (resumable per batch)."""
    out = run_dir / "expansion"
    out.mkdir(parents=True, exist_ok=True)
    codec = PromptCodec(model.tokenizer, task)
    spec = dataclasses.replace(expansion_spec(cfg), stop=codec.stop)
    bs = cfg.tree.questions_per_batch

    def save(b: int, arrays: dict) -> None:
        exs = [train[i] for i in arrays["index"]]
        texts = {r: decode_level(model.tokenizer, arrays[f"{r}_tokens"], arrays[f"{r}_lengths"]) for r in ROLES}
        arrays["rewards"] = grade_leaves(task, exs, texts["R"])
        _write_atomic(out / f"batch_{b:05d}.jsonl", "".join(
            json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "G": texts["G"][q].tolist(),
                        "V": texts["V"][q].tolist(), "R": texts["R"][q].tolist(),
                        "rewards": arrays["rewards"][q].tolist()}) + "\n" for q, ex in enumerate(exs)))
        # last: a batch counts as done once its arrays exist
        _write_atomic(out / f"batch_{b:05d}.npz", lambda f: np.savez(f, **arrays))

    sample_trees(model, codec, train, spec, seed=cfg.train.seed, batch_size=bs, on_batch=save,
                 skip=lambda b: (out / f"batch_{b:05d}.npz").exists(), desc="expand (train trees)",
                 progress=progress, mesh=mesh)
    # Batches are skipped by file name; files written with another batch size (e.g. a resume
    # on another device count, which rounds the batch) would silently drop or repeat questions.
    held: list[int] = []
    for f in out.glob("batch_*[0-9].npz"):
        with np.load(f) as z:
            held += z["index"].tolist()
    held.sort()
    if held != list(range(len(train))):
        raise ValueError(f"{out}: the expansion batches hold {len(held)} question(s) ({len(set(held))} distinct) "
                         f"but the run has {len(train)} training questions; they were written with another batch "
                         f"size or device count. Delete {out} to redo the expansion.")
    return out


def load_expansion(run_dir: Path) -> dict[str, np.ndarray]:
    files = sorted((run_dir / "expansion").glob("batch_*[0-9].npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir / 'expansion'}: no expansion batches; run the expand stage first")
    parts = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------------
# credit assignment -> per-role datasets


def _ids(tokens: np.ndarray, length: int) -> list[int]:
    return tokens[:length].tolist()


def node_context(trees: dict[str, np.ndarray], turns: tuple[list[int], list[int]], coord: Sequence[int]) -> list[int]:
    """Prompt tokens of the node at ``coord`` = (q, i[, j[, k]]) (the context before its output)."""
    q = coord[0]
    ctx = _ids(trees["q_tokens"][q], trees["q_lens"][q])
    if len(coord) >= 3:
        i = coord[1]
        ctx += _ids(trees["G_tokens"][q, i], trees["G_lengths"][q, i]) + turns[0]
    if len(coord) == 4:
        i, j = coord[1], coord[2]
        ctx += _ids(trees["V_tokens"][q, i, j], trees["V_lengths"][q, i, j]) + turns[1]
    return ctx


def node_output(trees: dict[str, np.ndarray], coord: Sequence[int], end_token: int) -> list[int]:
    """The node's generated tokens, plus the end-of-turn token if it stopped by itself."""
    role = ROLES[len(coord) - 2]
    c = tuple(coord)
    out = _ids(trees[f"{role}_tokens"][c], trees[f"{role}_lengths"][c])
    return out + [end_token] if trees[f"{role}_stopped"][c] else out


def build_datasets(trees: dict[str, np.ndarray], turns, end_token: int, threshold: float,
                   max_pairs_per_parent: int | None, seed: int) -> tuple[dict, dict]:
    """Value iteration + labels -> per-role SFT examples and DPO pairs (token level)."""
    values = credit_lib.node_values(jnp.asarray(trees["rewards"]), threshold=threshold)
    datasets: dict[str, dict[str, list]] = {}
    for role in ROLES:
        sft = [{"prompt": node_context(trees, turns, c), "completion": node_output(trees, c, end_token),
                "coord": [int(x) for x in c]} for c in credit_lib.sft_indices(values, role)]
        dpo = []
        for chosen, rejected in credit_lib.dpo_pairs(values, role, max_pairs_per_parent, seed):
            dpo.append({"prompt": node_context(trees, turns, chosen),
                        "chosen": node_output(trees, chosen, end_token),
                        "rejected": node_output(trees, rejected, end_token),
                        "coords": [[int(x) for x in chosen], [int(x) for x in rejected]]})
        datasets[role] = {"sft": sft, "dpo": dpo}
    return datasets, credit_lib.summary(values, max_pairs_per_parent)


def run_credit(cfg: RunConfig, model: Model, task: Task, run_dir: Path) -> dict:
    """Stage 2: value iteration, labels, SFT sets and DPO pairs for each role."""
    out = run_dir / "credit"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    trees = load_expansion(run_dir)
    codec = PromptCodec(model.tokenizer, task)
    datasets, summary = build_datasets(trees, codec.turns, codec.end_of_turn, cfg.train.value_threshold,
                                       cfg.train.max_pairs_per_parent, cfg.train.seed)
    for role, d in datasets.items():
        for kind, rows in d.items():
            _write_atomic(out / f"{role}_{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    summary["leaf_accuracy"] = float(trees["rewards"].mean())
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))  # last: marks the stage done
    return summary


def load_datasets(run_dir: Path, role: str) -> tuple[list, list]:
    from malt_jax.data import DPOExample, SFTExample

    d = run_dir / "credit"

    def rows(kind):
        p = d / f"{role}_{kind}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the credit stage first")
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    sft = [SFTExample(prompt=r["prompt"], completion=r["completion"]) for r in rows("sft")]
    dpo = [DPOExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in rows("dpo")]
    return sft, dpo


# ----------------------------------------------------------------------------------------------
# training


def save_adapter(adapter: Params, path: Path) -> None:
    """Writes an adapter as safetensors (flat ``layers.<name>.<a|b>`` keys); atomic."""
    from safetensors.numpy import save

    flat = {f"layers.{n}.{f}": np.asarray(adapter["layers"][n][f]) for n in adapter["layers"] for f in ("a", "b")}
    _write_atomic(path, lambda f: f.write(save(flat)))


def load_adapter(path: Path) -> Params:
    from safetensors.numpy import load_file

    layers: dict[str, dict] = {}
    for k, v in load_file(str(path)).items():
        _, name, f = k.split(".")
        layers.setdefault(name, {})[f] = jnp.asarray(v)
    return {"layers": layers}


def _subsample(rows: list, cap: int, seed: int) -> list:
    """A seeded random subset of at most ``cap`` rows (in their original order); cap 0 = all."""
    if not cap or len(rows) <= cap:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), cap, replace=False))
    return [rows[i] for i in keep]


def run_train(cfg: RunConfig, model: Model, run_dir: Path, mesh=None, progress: bool = True,
              roles: Sequence[str] = ROLES) -> dict[str, Params]:
    """Stage 3: SFT for every role, then DPO for V and R (and G if ``train.generator_dpo``)."""
    from malt_jax.train import train_role

    out = run_dir / "adapters"
    out.mkdir(parents=True, exist_ok=True)
    adapters = {}
    for role in roles:
        final = out / f"{role}.safetensors"
        if final.exists():
            adapters[role] = load_adapter(final)
            continue
        sft, dpo = load_datasets(run_dir, role)
        if role == "G" and not cfg.train.generator_dpo:
            dpo = []
        sft = _subsample(sft, cfg.train.max_sft_examples, cfg.train.seed)
        dpo = _subsample(dpo, cfg.train.max_dpo_pairs, cfg.train.seed)
        adapter, history = train_role(model.params, model.cfg, cfg.lora, cfg.train, sft, dpo,
                                      ROLE_NAMES[role], out / f"{role}_ckpt", mesh=mesh, progress=progress,
                                      pad_id=model.tokenizer.pad_id)
        _write_atomic(out / f"{role}_history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
        save_adapter(adapter, final)
        adapters[role] = adapter
    return adapters


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclasses.dataclass(frozen=True)
class System:
    """An inference run: depth 1 (single model) or 3 (G->V->R chain), ``votes`` parallel passes,
    greedy or sampled, base or MALT adapters. A run with ``votes > 1`` reports two systems:
    ``name`` (its first pass alone: one sampled chain, no vote) and ``name+MV@k``."""

    name: str
    depth: int
    votes: int
    greedy: bool
    trained: bool


def default_systems(votes: int = 3) -> list[System]:
    return [System("single-greedy", 1, 1, True, False), System("single", 1, votes, False, False),
            System("chain", 3, votes, False, False), System("malt", 3, votes, False, True)]


def _score(system: System, task: Task, ex: Example, texts: dict[str, list[str]]) -> dict:
    """One question's row: the final role's ``system.votes`` texts graded, and their vote."""
    from malt_jax.evaluate import majority_vote

    finals = texts[ROLES[system.depth - 1]]
    answers = [task.extract(t) for t in finals]
    correct = [bool(task.grade_example(t, ex)) for t in finals]
    voted = majority_vote(answers)
    return {"id": ex.id, "gold": ex.answer, "pass_answers": answers, "pass_correct": correct,
            "vote_answer": voted, "vote_correct": bool(voted is not None and correct[answers.index(voted)]),
            "texts": texts}


def _read_rows(path: Path, n: int) -> list[dict] | None:
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if len(rows) == n:
            return rows
    return None


def _write_rows(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def evaluate_system(system: System, cfg: RunConfig, model: Model, task: Task, examples: Sequence[Example],
                    adapters: dict[str, Params] | None, out_path: Path, progress: bool = True,
                    mesh=None) -> list[dict]:
    """Runs one system on ``examples``; per-question rows, also written as jsonl."""
    from malt_jax.model.lora import lora_scale

    rows = _read_rows(out_path, len(examples))
    if rows is not None:
        return rows
    codec = PromptCodec(model.tokenizer, task)
    e = cfg.eval
    sampling = dataclasses.replace(cfg.sampling, greedy=system.greedy, temperature=e.temperature)
    trained = system.trained and adapters is not None
    spec = ExpansionSpec(n=system.votes, m=1, l=1, depth=system.depth, max_new=(e.max_new_tokens,) * 3,
                         sampling=sampling, stop=codec.stop, mode="fork" if trained else "extend")
    ads = tuple(adapters[r] for r in ROLES) if trained else (None, None, None)
    rows = []

    def on_batch(b: int, arrays: dict) -> None:
        texts = {r: decode_level(model.tokenizer, arrays[f"{r}_tokens"], arrays[f"{r}_lengths"])
                 for r in ROLES[: system.depth]}
        for q, i in enumerate(arrays["index"]):
            rows.append(_score(system, task, examples[i], {r: texts[r][q].reshape(-1).tolist() for r in texts}))

    batch = max(1, min(len(examples), e.batch_questions or len(examples)))
    sample_trees(model, codec, examples, spec, seed=e.seed, batch_size=batch, adapters=ads,
                 lora_scale=lora_scale(cfg.lora), on_batch=on_batch, desc=f"eval {system.name}", progress=progress,
                 mesh=mesh)
    _write_rows(out_path, rows)
    return rows


def _shares_generator(single: System, chain: System) -> bool:
    """Whether ``single``'s samples are exactly ``chain``'s generator level: the untrained chain's
    first role is the single model, sampled with the same keys (see ``question_keys``)."""
    return (single.depth == 1 and chain.depth > 1 and not single.trained and not chain.trained
            and single.votes == chain.votes and single.greedy == chain.greedy)


def derive_single(single: System, chain_rows: list[dict], task: Task, examples: Sequence[Example],
                  out_path: Path) -> list[dict]:
    """``single``'s rows scored from the untrained chain's generator texts (no new sampling)."""
    rows = [_score(single, task, ex, {"G": r["texts"]["G"]}) for ex, r in zip(examples, chain_rows, strict=True)]
    _write_rows(out_path, rows)
    return rows


def system_results(system: System, rows: list[dict]) -> dict:
    """``SystemResult``s of a run: its first pass, and its majority vote when it has several."""
    from malt_jax.evaluate import SystemResult

    out = {system.name: SystemResult(system.name, np.asarray([r["pass_correct"][0] for r in rows], bool),
                                      [r["pass_answers"][0] for r in rows])}
    if system.votes > 1:
        name = f"{system.name}+MV@{system.votes}"
        out[name] = SystemResult(name, np.asarray([r["vote_correct"] for r in rows], bool),
                                 [r["vote_answer"] for r in rows])
    return out


def run_eval(cfg: RunConfig, model: Model, task: Task, examples: Sequence[Example], run_dir: Path,
             adapters: dict[str, Params] | None, systems: Sequence[System] | None = None,
             progress: bool = True, mesh=None) -> dict:
    """Stage 4: every system on the held-out questions, paired statistics, report."""
    from malt_jax.evaluate import compare

    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    systems = list(systems or default_systems(cfg.eval.votes))
    # A single-model system whose samples are an untrained chain's generator level is scored
    # from that chain's texts: the chain runs first and the single model is not sampled again.
    source = {s.name: next((c for c in systems if _shares_generator(s, c)), None) for s in systems}
    order = sorted(systems, key=lambda s: source[s.name] is not None)
    results, trained_names, all_rows = {}, [], {}
    for sys_ in order:
        if sys_.trained and adapters is None:
            continue
        path = out / f"{sys_.name}.jsonl"
        chain = source[sys_.name]
        if chain is not None and _read_rows(path, len(examples)) is None:
            rows = derive_single(sys_, all_rows[chain.name], task, examples, path)
        else:
            rows = evaluate_system(sys_, cfg, model, task, examples, adapters, path, progress, mesh=mesh)
        all_rows[sys_.name] = rows
    for sys_ in systems:  # the report lists systems in the given order
        if sys_.name in all_rows:
            res = system_results(sys_, all_rows[sys_.name])
            results.update(res)
            if sys_.trained:
                trained_names += list(res)
    baselines = [n for n in results if n not in trained_names]
    comparisons = []
    for target in trained_names:
        comparisons += compare(results, target, baselines, cfg.eval.bootstrap_samples, cfg.eval.seed)
    return {"results": results, "comparisons": comparisons}


# ----------------------------------------------------------------------------------------------
# the whole run


def make_run_mesh(cfg: RunConfig):
    """The run's mesh (``cfg.mesh``; default: every device on ``data``), or None on one device."""
    from malt_jax.sharding import make_mesh

    if jax.device_count() == 1 and not cfg.mesh:
        return None
    return make_mesh(dict(cfg.mesh) or None)


def _write_atomic(path: Path, content: str | Callable[[Any], Any]) -> None:
    """Writes ``content`` (text, or a function writing to a binary file) to ``path`` atomically:
    readers see the old file or the whole new one. The temporary name is unique per process, so
    the processes of a multi-host run may all write the same (identical) file."""
    import jax

    tmp = path.with_name(f".{path.name}.{jax.process_index()}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            with open(tmp, "wb") as f:
                content(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Creates the run directory with the resolved config; refuses a directory of another config."""
    import yaml

    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} exists and is not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = run_dir / "config.yaml"
    h = cfg.hash()
    if stamp.exists():
        old = yaml.safe_load(stamp.read_text()) or {}
        if old.get("config_hash") != h:
            raise ValueError(f"{run_dir} holds a run with another config (hash {old.get('config_hash')}, this one "
                             f"is {h}); use a new run_dir or delete the old one")
    else:
        _write_atomic(stamp, yaml.safe_dump({"config_hash": h, **to_dict(cfg)}, sort_keys=False))
    return run_dir


def load_splits(cfg: RunConfig, task: Task, run_dir: Path) -> tuple[list[Example], list[Example]]:
    """Seeded train/eval questions; the ids are written to ``splits.json`` in the run dir."""
    from malt_jax.tasks import train_eval_sets

    t = cfg.task
    opts = dict(t.options)
    train_split, eval_split = opts.pop("train_split", "train"), opts.pop("eval_split", "test")
    train, evals = train_eval_sets(task, t.num_train, t.num_eval, t.seed, train_split, eval_split)
    path = run_dir / "splits.json"
    if not path.exists():
        _write_atomic(path, json.dumps({"seed": t.seed, "train": [e.id for e in train], "eval": [e.id for e in evals]}))
    return train, evals


def make_task(cfg: RunConfig) -> Task:
    from malt_jax.tasks import get_task

    from malt_jax.config import ConfigError

    opts = {k: v for k, v in cfg.task.options if k not in ("train_split", "eval_split")}
    try:
        return get_task(cfg.task.name, path=cfg.task.path or None, **opts)
    except (TypeError, ValueError) as e:  # unknown task / option, bad option value
        raise ConfigError(f"task {cfg.task.name!r} (options {opts}): {e}") from None


def run(cfg: RunConfig, stages: Sequence[str] = ("expand", "credit", "train", "eval"), progress: bool = True,
        model: Model | None = None, task: Task | None = None) -> dict:
    """Runs the MALT pipeline (each stage resumable) and writes the report; returns a summary."""
    from malt_jax.report import format_table, write_report

    run_dir = prepare_run_dir(cfg)
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    t0 = time.perf_counter()
    task = task or make_task(cfg)  # data and task errors surface before the (slow) model load
    train, evals = load_splits(cfg, task, run_dir)
    model = model or load_model(cfg.weights, cfg.model)
    mesh = make_run_mesh(cfg)
    if mesh is not None:
        from malt_jax.sharding import shard_params

        model = dataclasses.replace(model, params=shard_params(model.params, mesh))
    timings["load"] = round(time.perf_counter() - t0, 1)
    summary: dict[str, Any] = {"run_dir": str(run_dir)}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 1)
        _write_atomic(timings_path, json.dumps(timings, indent=2))
        return out

    if "expand" in stages:
        timed("expand", lambda: run_expand(cfg, model, task, train, run_dir, progress, mesh=mesh))
    credit_summary = None
    if "credit" in stages:
        credit_summary = timed("credit", lambda: run_credit(cfg, model, task, run_dir))
        summary["credit"] = credit_summary
    adapters = None
    if "train" in stages:
        adapters = timed("train", lambda: run_train(cfg, model, run_dir, mesh=mesh, progress=progress))
    elif (run_dir / "adapters").exists() and all((run_dir / "adapters" / f"{r}.safetensors").exists() for r in ROLES):
        adapters = {r: load_adapter(run_dir / "adapters" / f"{r}.safetensors") for r in ROLES}
    if "eval" in stages:
        ev = timed("eval", lambda: run_eval(cfg, model, task, evals, run_dir, adapters, progress=progress,
                                            mesh=mesh))
        if credit_summary is None and (run_dir / "credit" / "summary.json").exists():
            credit_summary = json.loads((run_dir / "credit" / "summary.json").read_text())
        meta = {"model": cfg.weights, "task": cfg.task.name, "questions": len(evals),
                "train questions": len(train), "tree": f"{cfg.tree.n}x{cfg.tree.m}x{cfg.tree.l}",
                "seeds": f"split {cfg.task.seed}, train {cfg.train.seed}, eval {cfg.eval.seed}",
                "config hash": cfg.hash(), "wall_times": dict(timings)}
        report = write_report(run_dir, ev["results"], ev["comparisons"], credit_summary, meta)
        summary.update(table=format_table(ev["results"]), report=str(report), comparisons=ev["comparisons"])
    summary["timings"] = timings
    return summary
