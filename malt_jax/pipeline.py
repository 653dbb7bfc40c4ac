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
import functools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from malt_jax import credit as credit_lib
from malt_jax import tblog
from malt_jax.config import ModelConfig, RunConfig, to_dict
from malt_jax.distributed import fetch, is_lead
from malt_jax.expansion import Contexts, ExpansionSpec, expand
from malt_jax.model.llama import Params, init_params
from malt_jax.model.tokenizer import Tokenizer
from malt_jax.sampling import StopCriteria, pad_batch
from malt_jax.tasks import Example, Task, role_messages

log = logging.getLogger(__name__)

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


_G, _V = "\x00GEN\x00", "\x00VER\x00"  # sentinels for the earlier outputs while rendering


@dataclasses.dataclass(frozen=True)
class PromptCodec:
    """Token-level rendering of the G -> V -> R contexts of a task, in one of two framings.

    The context of level 1 (V) is ``prefixes(q)[0] + g + seps[0][0]`` and that of level 2 (R)
    ``prefixes(q)[1] + g + seps[1][0] + v + seps[1][1]``: a per-question prefix and constant
    separators between the earlier outputs (tokens as sampled, never re-tokenized).

    * ``framing="chat"``: one growing chat, so both prefixes are the question prompt and the
      separators are the role turns: ``seps = ((t_v,), (t_v, t_r))``.
    * ``framing="separate"``: each role has its own system prompt and a user turn quoting the
      question and the earlier outputs (``tasks.prompts.separate_messages``).

    A role's reply prefix (``RolePrompts.verifier_prefix`` / ``refiner_prefix``) ends its
    separator, so it is context, and :meth:`text` puts it back in front of the output.
    """

    tokenizer: Tokenizer
    task: Task
    framing: str = "chat"

    def __post_init__(self) -> None:
        from malt_jax.tasks.prompts import FRAMINGS

        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {self.framing!r}")
        if self.framing == "separate" and not self.task.prompts.has_separate:
            raise ValueError(f"task {self.task.name!r}: the separate framing needs the role prompts "
                             "verifier_separate and refiner_separate")

    def question(self, q: str) -> list[int]:
        return self.tokenizer.encode_chat(role_messages(self.task.prompts, "G", q))

    def _render(self, role: str, q: str) -> str:
        from malt_jax.tasks.prompts import separate_messages

        p = self.task.prompts
        msgs = role_messages if self.framing == "chat" else separate_messages
        return self.tokenizer.apply_chat_template(msgs(p, role, q, generator_out=_G,
                                                       verifier_out=p.verifier_prefix + _V))

    def prefixes(self, q: str) -> tuple[list[int], list[int]]:
        """Per-question prefixes of the V and R contexts (before the generator's answer)."""
        if self.framing == "chat":
            g = self.question(q)
            return g, g
        return tuple(self.tokenizer.encode(self._render(r, q).split(_G)[0], add_special_tokens=False)
                     for r in ("V", "R"))

    @functools.cached_property
    def seps(self) -> tuple[tuple[list[int]], tuple[list[int], list[int]]]:
        """Constant tokens after each earlier output: ``((after g,), (after g, after v))`` for V, R."""
        tok, p = self.tokenizer, self.task.prompts
        enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        if self.framing == "chat":
            q = "QUESTION"
            s_g = tok.apply_chat_template(role_messages(p, "G", q))
            s_v, s_r = self._render("V", q), self._render("R", q)
            if not (s_v.startswith(s_g + _G) and s_r.startswith(s_v + p.verifier_prefix + _V)):
                raise ValueError("the chat template does not render the G -> V -> R roles as one growing "
                                 "conversation; prefix sharing needs that (check the task's prompts)")
            t_v = enc(s_v[len(s_g) + len(_G):] + p.verifier_prefix)
            t_r = enc(s_r[len(s_v) + len(p.verifier_prefix) + len(_V):] + p.refiner_prefix)
            return (t_v,), (t_v, t_r)
        out = []
        for role, prefix in (("V", p.verifier_prefix), ("R", p.refiner_prefix)):
            pieces = [self._render(role, q).split(_G, 1)[1] for q in ("QUESTION A", "QUESTION B")]
            if pieces[0] != pieces[1]:
                raise ValueError(f"the {role} prompt of the separate framing must quote the question before the "
                                 "answer and the critique (the text after them must not depend on the question)")
            after = pieces[0].split(_V) if role == "R" else [pieces[0]]
            after[-1] += prefix
            out.append(tuple(enc(t) for t in after))
        return tuple(out)  # type: ignore[return-value]

    @property
    def turns(self) -> tuple[list[int], list[int]]:
        """The chat framing's V and R turn tokens (``seps[1]``)."""
        if self.framing != "chat":
            raise ValueError("turns exist in the chat framing only; use prefixes() and seps")
        return self.seps[1]

    @property
    def stop(self) -> StopCriteria:
        """The tokenizer's stop ids plus the template's end-of-turn token (so a trained role, whose
        SFT completions end with it, stops there whatever the tokenizer calls it)."""
        ids = tuple(self.tokenizer.stop_ids)
        return StopCriteria(stop_ids=ids if self.end_of_turn in ids else ids + (self.end_of_turn,))

    @functools.cached_property
    def end_of_turn(self) -> int:
        """Token appended to a completion that stopped by itself: the first token the template
        writes after an assistant reply."""
        msgs = role_messages(self.task.prompts, "V", "QUESTION", generator_out=_G)[:3]
        text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=False).split(_G, 1)[1]
        return self.tokenizer.encode(text, add_special_tokens=False)[0]

    def text(self, role: str, output: str) -> str:
        """A role's reply as read by graders and later roles: its prefix + the sampled output."""
        return self.task.prompts.prefix(role) + output


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
    on_level: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Samples trees for ``examples`` in batches of ``batch_size`` questions.

    Every batch is padded to ``batch_size`` questions and one prompt width, so the whole
    stage compiles once. ``on_batch(index, arrays)`` receives host arrays per batch;
    ``on_level(level, tokens, lengths)`` (optional, one device) the rows of each level of the
    current batch as soon as that level is sampled (flat rows, padding questions included). With a
    ``mesh``, the question batch (rounded up to a multiple of the data-parallel size) is split
    over the ``data``/``fsdp`` axes and every tree row is sampled on its question's device.
    """
    from tqdm.auto import tqdm

    from malt_jax.sharding import shard_batch

    if mesh is not None:
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // dp) * dp

    q_ids = [codec.question(e.question) for e in examples]
    width = _bucket32(max(len(q) for q in q_ids))
    separate = codec.framing == "separate" and spec.depth > 1
    if separate:  # the V and R contexts' per-question prefixes, padded to one width per level
        pre = [codec.prefixes(e.question) for e in examples]
        pre_width = [_bucket32(max(len(p[lv]) for p in pre)) for lv in range(2)]
        seps = tuple(tuple(jnp.asarray(t, jnp.int32) for t in level) for level in codec.seps)
        turns = None
    else:
        turns = tuple(jnp.asarray(t, jnp.int32) for t in codec.seps[1])
    n_batches = -(-len(examples) // batch_size)
    todo = [b for b in range(n_batches) if not skip(b)]
    bar = tqdm(total=len(todo) * batch_size, desc=desc, unit="q", disable=not progress, dynamic_ncols=True)
    for b in todo:
        lo, hi = b * batch_size, min(len(examples), (b + 1) * batch_size)
        idx = list(range(lo, hi)) + [lo] * (batch_size - (hi - lo))  # pad with copies, dropped below
        x, lens = pad_batch([q_ids[i] for i in idx], bucket=width)
        k = hi - lo
        arrays = {"index": np.arange(lo, hi), "q_tokens": x[:k], "q_lens": lens[:k]}
        t0 = time.perf_counter()
        inputs: tuple = (jnp.asarray(x), jnp.asarray(lens), question_keys(seed, idx))
        contexts = None
        if separate:
            prefix_arrays = []
            for lv, role in enumerate(ROLES[1:]):
                px, pl = pad_batch([pre[i][lv] for i in idx], bucket=pre_width[lv])
                arrays[f"{role}_prefix"], arrays[f"{role}_prefix_lens"] = px[:k], pl[:k]
                prefix_arrays.append((jnp.asarray(px), jnp.asarray(pl)))
            inputs += tuple(prefix_arrays)
        if mesh is not None:
            inputs = shard_batch(inputs, mesh)
        if separate:
            (pv, lv_), (pr, lr) = inputs[3], inputs[4]
            contexts = Contexts(prefixes=(pv, pr), prefix_lens=(lv_, lr), seps=seps)
        tree = expand(model.params, tuple(adapters), inputs[0], inputs[1], turns, inputs[2],
                      cfg=model.cfg, spec=spec, lora_scale=lora_scale, contexts=contexts, emit=on_level)
        tree = fetch(tree)
        dt = time.perf_counter() - t0
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


def _bucket32(n: int) -> int:
    return -(-n // 32) * 32


def decode_level(tokenizer: Tokenizer, tokens: np.ndarray, lengths: np.ndarray, prefix: str = "") -> np.ndarray:
    """Object array of texts shaped like ``lengths`` (each ``prefix`` + the decoded output)."""
    flat_t = tokens.reshape(-1, tokens.shape[-1])
    flat_l = lengths.reshape(-1)
    out = np.empty(flat_l.shape[0], dtype=object)
    for i in range(flat_l.shape[0]):
        out[i] = prefix + tokenizer.decode(flat_t[i, : flat_l[i]].tolist(), skip_special_tokens=True)
    return out.reshape(lengths.shape)


def decode_tree(codec: PromptCodec, arrays: dict, roles: Sequence[str] = ROLES) -> dict[str, np.ndarray]:
    """Each role's texts of a sampled tree, read as graders and later roles read them."""
    return {r: decode_level(codec.tokenizer, arrays[f"{r}_tokens"], arrays[f"{r}_lengths"],
                            codec.task.prompts.prefix(r)) for r in roles}


def grade_leaves(task: Task, examples: Sequence[Example], texts: np.ndarray,
                 stopped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(rewards, lenient)`` [Q, ...] of the final-role texts [Q, ...] against each question's gold.

    ``lenient`` is the task's grade (it may fall back to e.g. the last number in the text);
    ``rewards`` is 1 only where ``lenient`` is 1, the text states its answer explicitly
    (``task.has_explicit_answer``) and the completion stopped by itself (``stopped``, bool
    [Q, ...]; None = all stopped), so a refinement cut off at "... 2 + 4 = " earns nothing.
    Tasks with ``strict_rewards = False`` get ``rewards == lenient``.
    """
    strict = getattr(task, "strict_rewards", True)
    rewards = np.zeros(texts.shape, np.float32)
    lenient = np.zeros(texts.shape, np.float32)
    for q, ex in enumerate(examples):
        for idx in np.ndindex(texts.shape[1:]):
            c = (q,) + idx
            lenient[c] = task.grade_example(texts[c], ex)
            if lenient[c] and (not strict or ((stopped is None or stopped[c])
                                              and task.has_explicit_answer(texts[c], ex))):
                rewards[c] = 1.0
    return rewards, lenient


def expansion_spec(cfg: RunConfig, **kw: Any) -> ExpansionSpec:
    t, s = cfg.tree, cfg.sampling
    base = dict(n=t.n, m=t.m, l=t.l, max_new=s.budgets(), sampling=s,
                mode="extend" if t.share_prefix else "naive")
    base.update(kw)
    return ExpansionSpec(**base)


def run_expand(cfg: RunConfig, model: Model, task: Task, train: Sequence[Example], run_dir: Path,
               progress: bool = True, mesh=None) -> Path:
    """Stage 1: trajectory expansion of the training questions (resumable per batch)."""
    out = run_dir / "expansion"
    out.mkdir(parents=True, exist_ok=True)
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    spec = dataclasses.replace(expansion_spec(cfg), stop=codec.stop)
    bs = cfg.tree.questions_per_batch

    def save(b: int, arrays: dict) -> None:
        exs = [train[i] for i in arrays["index"]]
        texts = decode_tree(codec, arrays)
        arrays["rewards"], arrays["rewards_lenient"] = grade_leaves(task, exs, texts["R"], arrays["R_stopped"])
        # whether each generator answer is right (graded as evaluation grades it): the verifier's
        # training data is balanced over right and wrong answers, and its verdicts are scored
        arrays["G_correct"] = grade_leaves(task, exs, texts["G"])[1] > 0
        arrays["rewards_explicit"] = np.array([[task.has_explicit_answer(t, ex) for t in texts["R"][q].reshape(-1)]
                                               for q, ex in enumerate(exs)], bool).reshape(texts["R"].shape)
        _write_atomic(out / f"batch_{b:05d}.jsonl", "".join(
            json.dumps({"id": ex.id, "question": ex.question, "gold": ex.answer, "G": texts["G"][q].tolist(),
                        "V": texts["V"][q].tolist(), "R": texts["R"][q].tolist(),
                        "rewards": arrays["rewards"][q].tolist(),
                        "rewards_lenient": arrays["rewards_lenient"][q].tolist()}) + "\n" for q, ex in enumerate(exs)))
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


def node_context(trees: dict[str, np.ndarray], seps, coord: Sequence[int]) -> list[int]:
    """Prompt tokens of the node at ``coord`` = (q, i[, j[, k]]) (the context before its output).

    ``seps`` = :attr:`PromptCodec.seps`. V and R contexts start with the per-question prefix the
    sampler used (``V_prefix`` / ``R_prefix`` in the separate framing, else the question prompt).
    """
    q, level = coord[0], len(coord) - 2
    if level == 0:
        return _ids(trees["q_tokens"][q], trees["q_lens"][q])
    role = ROLES[level]
    if f"{role}_prefix" in trees:
        ctx = _ids(trees[f"{role}_prefix"][q], trees[f"{role}_prefix_lens"][q])
    else:
        ctx = _ids(trees["q_tokens"][q], trees["q_lens"][q])
    for a in range(level):
        c = tuple(coord[: a + 2])
        ctx += _ids(trees[f"{ROLES[a]}_tokens"][c], trees[f"{ROLES[a]}_lengths"][c]) + list(seps[level - 1][a])
    return ctx


def node_output(trees: dict[str, np.ndarray], coord: Sequence[int], end_token: int) -> list[int]:
    """The node's generated tokens, plus the end-of-turn token if it stopped by itself."""
    role = ROLES[len(coord) - 2]
    c = tuple(coord)
    out = _ids(trees[f"{role}_tokens"][c], trees[f"{role}_lengths"][c])
    return out + [end_token] if trees[f"{role}_stopped"][c] else out


def _balance_weights(classes: Sequence[bool]) -> list[float]:
    """Example weights giving each class half of the total weight (mean weight 1); all 1 when a
    class is missing."""
    n, n_true = len(classes), int(sum(classes))
    if n_true in (0, n):
        return [1.0] * n
    w_true, w_false = n / (2.0 * n_true), n / (2.0 * (n - n_true))
    return [w_true if c else w_false for c in classes]


def build_datasets(trees: dict[str, np.ndarray], seps, end_token: int, threshold: float,
                   max_pairs_per_parent: int | None, seed: int,
                   verifier_balance: bool = False) -> tuple[dict, dict]:
    """Value iteration + labels -> per-role SFT examples and DPO pairs (token level).

    DPO pairs whose chosen and rejected completions are the same tokens are dropped (counted as
    ``<role>/dpo_identical``). With ``verifier_balance`` (and ``G_correct`` in the trees), the
    verifier's SFT examples and DPO pairs are weighted so that those under right and under wrong
    generator answers carry equal total weight: most positive critiques sit under right answers,
    and unweighted SFT would teach the verifier to call every answer correct.
    """
    values = credit_lib.node_values(jnp.asarray(trees["rewards"]), threshold=threshold)
    summary = credit_lib.summary(values, max_pairs_per_parent)
    datasets: dict[str, dict[str, list]] = {}
    for role in ROLES:
        sft = [{"prompt": node_context(trees, seps, c), "completion": node_output(trees, c, end_token),
                "coord": [int(x) for x in c]} for c in credit_lib.sft_indices(values, role)]
        dpo, identical = [], 0
        for chosen, rejected in credit_lib.dpo_pairs(values, role, max_pairs_per_parent, seed):
            row = {"prompt": node_context(trees, seps, chosen), "chosen": node_output(trees, chosen, end_token),
                   "rejected": node_output(trees, rejected, end_token),
                   "coords": [[int(x) for x in chosen], [int(x) for x in rejected]]}
            if row["chosen"] == row["rejected"]:
                identical += 1
                continue
            dpo.append(row)
        summary[f"{credit_lib.normalize_role(role)}/dpo_identical"] = identical
        summary[f"{credit_lib.normalize_role(role)}/dpo_pairs"] = len(dpo)
        if role == "V" and "G_correct" in trees:
            g_ok = trees["G_correct"]
            sft_cls = [bool(g_ok[r["coord"][0], r["coord"][1]]) for r in sft]
            dpo_cls = [bool(g_ok[r["coords"][0][0], r["coords"][0][1]]) for r in dpo]
            summary["verifier/sft_under_right_answers"] = int(sum(sft_cls))
            summary["verifier/sft_under_wrong_answers"] = len(sft_cls) - int(sum(sft_cls))
            summary["verifier/dpo_under_right_answers"] = int(sum(dpo_cls))
            summary["verifier/dpo_under_wrong_answers"] = len(dpo_cls) - int(sum(dpo_cls))
            if verifier_balance:
                for rows, cls in ((sft, sft_cls), (dpo, dpo_cls)):
                    for r, w in zip(rows, _balance_weights(cls)):
                        r["weight"] = w
        datasets[role] = {"sft": sft, "dpo": dpo}
    return datasets, summary


def run_credit(cfg: RunConfig, model: Model, task: Task, run_dir: Path, out: Path | None = None,
               n_questions: int | None = None) -> dict:
    """Stage 2: value iteration, labels, SFT sets and DPO pairs for each role.

    ``n_questions``: use only the first that many trees (the study's nested training sets),
    written to ``out`` (default ``run_dir / "credit"``).
    """
    out = out or run_dir / "credit"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    trees = load_expansion(run_dir)
    if n_questions is not None:
        if n_questions > len(trees["index"]):
            raise ValueError(f"{run_dir}: {n_questions} questions asked, the expansion holds {len(trees['index'])}")
        trees = {k: v[:n_questions] for k, v in trees.items()}
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    datasets, summary = build_datasets(trees, codec.seps, codec.end_of_turn, cfg.train.value_threshold,
                                       cfg.train.max_pairs_per_parent, cfg.train.seed,
                                       verifier_balance=cfg.train.verifier_balance)
    for role, d in datasets.items():
        for kind, rows in d.items():
            _write_atomic(out / f"{role}_{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    summary["leaf_accuracy"] = float(trees["rewards"].mean())
    if "rewards_lenient" in trees:  # how often the lenient grade alone would have rewarded a leaf
        lenient = trees["rewards_lenient"] > 0
        fallback = {"leaves": int(lenient.size), "rewarded": int((trees["rewards"] > 0).sum()),
                    "rewarded_lenient": int(lenient.sum())}
        if "rewards_explicit" in trees:
            explicit = trees["rewards_explicit"].astype(bool)
            fallback["no_explicit_answer"] = int((lenient & ~explicit).sum())
            fallback["cut_off"] = int((lenient & explicit & ~trees["R_stopped"].astype(bool)).sum())
        summary["reward_fallback"] = fallback
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2))  # last: marks the stage done
    return summary


def load_datasets(run_dir: Path, role: str, with_questions: bool = False) -> tuple:
    """A role's SFT examples and DPO pairs from the credit stage (``run_dir/credit``); with
    ``with_questions`` also the training-question index of each (for held-out splits)."""
    from malt_jax.data import DPOExample, SFTExample

    d = run_dir / "credit"

    def rows(kind):
        p = d / f"{role}_{kind}.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing; run the credit stage first")
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    sft_rows, dpo_rows = rows("sft"), rows("dpo")
    sft = [SFTExample(prompt=r["prompt"], completion=r["completion"], weight=r.get("weight", 1.0)) for r in sft_rows]
    dpo = [DPOExample(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], weight=r.get("weight", 1.0))
           for r in dpo_rows]
    if with_questions:
        return sft, dpo, [r["coord"][0] for r in sft_rows], [r["coords"][0][0] for r in dpo_rows]
    return sft, dpo


# ----------------------------------------------------------------------------------------------
# training


def save_adapter(adapter: Params, path: Path) -> None:
    """Writes an adapter as safetensors (flat ``layers.<name>.<a|b>`` keys); atomic."""
    from safetensors.numpy import save

    host = fetch(adapter["layers"])
    flat = {f"layers.{n}.{f}": host[n][f] for n in host for f in ("a", "b")}
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


def heldout_questions(n_questions: int, fraction: float, seed: int) -> set[int]:
    """The training questions whose examples are held out to choose epochs (about ``fraction``
    of them, at least one when ``fraction > 0``; seeded, the same for every role)."""
    if fraction <= 0 or n_questions < 2:
        return set()
    k = min(n_questions - 1, max(1, round(fraction * n_questions)))
    return set(np.random.default_rng([seed, 0x4E1D]).choice(n_questions, k, replace=False).tolist())


def _split(examples: list, questions: list[int], held: set[int]) -> tuple[list, list]:
    return ([e for e, q in zip(examples, questions) if q not in held],
            [e for e, q in zip(examples, questions) if q in held])


def training_counts(run_dir: Path) -> dict:
    """``adapters/training.json``: per role the example counts (held out, before / after caps)."""
    p = run_dir / "adapters" / "training.json"
    return json.loads(p.read_text()) if p.exists() else {}


def run_train(cfg: RunConfig, model: Model, run_dir: Path, mesh=None, progress: bool = True,
              roles: Sequence[str] = ROLES) -> dict[str, Params]:
    """Stage 3: SFT for every role, then DPO for V and R (and G if ``train.generator_dpo``).

    The examples of a seeded ``train.heldout_fraction`` of the training questions are held out
    (by question, so no prompt is shared) to choose each stage's epochs; ``train.max_sft_examples``
    / ``max_dpo_pairs`` then cap the training part. The counts before and after are written to
    ``adapters/training.json`` (and the report). A role without any example keeps the base model.
    """
    from malt_jax.train import train_role

    out = run_dir / "adapters"
    out.mkdir(parents=True, exist_ok=True)
    n_questions = int(json.loads((run_dir / "credit" / "summary.json").read_text())["questions"])
    held = heldout_questions(n_questions, cfg.train.heldout_fraction, cfg.train.seed)
    counts = training_counts(run_dir)
    adapters = {}
    for role in roles:
        final = out / f"{role}.safetensors"
        if final.exists():
            adapters[role] = load_adapter(final)
            continue
        sft, dpo, sft_q, dpo_q = load_datasets(run_dir, role, with_questions=True)
        if role == "G" and not cfg.train.generator_dpo:
            dpo, dpo_q = [], []
        (sft_train, sft_held), (dpo_train, dpo_held) = _split(sft, sft_q, held), _split(dpo, dpo_q, held)
        c = {"heldout_questions": len(held),
             "sft": {"examples": len(sft), "heldout": len(sft_held), "train": len(sft_train)},
             "dpo": {"pairs": len(dpo), "heldout": len(dpo_held), "train": len(dpo_train)}}
        sft_train = _subsample(sft_train, cfg.train.max_sft_examples, cfg.train.seed)
        dpo_train = _subsample(dpo_train, cfg.train.max_dpo_pairs, cfg.train.seed)
        c["sft"]["train_after_cap"], c["dpo"]["train_after_cap"] = len(sft_train), len(dpo_train)
        for kind, cap in (("sft", cfg.train.max_sft_examples), ("dpo", cfg.train.max_dpo_pairs)):
            if c[kind]["train_after_cap"] < c[kind]["train"]:
                log.warning("%s: train.max_%s caps %d %s training examples to %d", role,
                            "sft_examples" if kind == "sft" else "dpo_pairs", c[kind]["train"], kind, cap)
        result = train_role(model.params, model.cfg, cfg.lora, cfg.train, sft_train, dpo_train,
                            ROLE_NAMES[role], out / f"{role}_ckpt", mesh=mesh, progress=progress,
                            pad_id=model.tokenizer.pad_id, sft_heldout=sft_held, dpo_heldout=dpo_held)
        c["trained"] = result.trained
        _write_atomic(out / f"{role}_history.jsonl", "".join(json.dumps(h) + "\n" for h in result.history))
        _write_atomic(out / f"{role}_epochs.jsonl", "".join(json.dumps(e) + "\n" for e in result.epochs))
        if is_lead():  # event files and plots are not atomic: one writer
            tblog.write_training(run_dir, role, result.history, result.epochs)
        save_adapter(result.sft_adapter, out / f"{role}_sft.safetensors")
        counts[role] = c
        _write_atomic(out / "training.json", json.dumps(counts, indent=2))
        save_adapter(result.adapter, final)  # last: its presence marks the role as finished
        adapters[role] = result.adapter
    return adapters


def load_adapters(run_dir: Path) -> tuple[dict[str, Params] | None, dict[str, Params] | None]:
    """The roles' adapters after DPO and after SFT only (``None`` where a role's file is missing)."""
    d = run_dir / "adapters"

    def load(suffix: str) -> dict[str, Params] | None:
        paths = {r: d / f"{r}{suffix}.safetensors" for r in ROLES}
        if not all(p.exists() for p in paths.values()):
            return None
        return {r: load_adapter(p) for r, p in paths.items()}

    return load(""), load("_sft")


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclasses.dataclass(frozen=True)
class System:
    """An inference run: depth 1 (single model) or 3 (G->V->R chain), ``votes`` parallel passes,
    greedy or sampled, base or trained adapters (``stage`` "final": after SFT and DPO, "sft":
    after SFT only). A run with ``votes > 1`` reports two systems: ``name`` (its first pass
    alone: one sampled chain, no vote) and ``name+MV@k``."""

    name: str
    depth: int
    votes: int
    greedy: bool
    trained: bool
    stage: str = "final"


def default_systems(votes: int = 3, sft_chain: bool = False) -> list[System]:
    """single-greedy, single (+MV), the untrained chain (+MV), MALT (+MV) and, with ``sft_chain``,
    the SFT-only trained chain (the paper's STaR-style ablation)."""
    systems = [System("single-greedy", 1, 1, True, False), System("single", 1, votes, False, False),
               System("chain", 3, votes, False, False)]
    if sft_chain:
        systems.append(System("sft-chain", 3, votes, False, True, stage="sft"))
    return systems + [System("malt", 3, votes, False, True)]


def primary_names(votes: int) -> tuple[str, str]:
    """The pre-declared primary comparison: MALT+MV@k vs single+MV@k (MALT vs single at one vote)."""
    suffix = f"+MV@{votes}" if votes > 1 else ""
    return f"malt{suffix}", f"single{suffix}"


def _score(system: System, task: Task, ex: Example, texts: dict[str, list[str]]) -> dict:
    """One question's row: the final role's ``system.votes`` texts graded, and their vote."""
    from malt_jax.evaluate import majority_vote

    finals = texts[ROLES[system.depth - 1]]
    answers = [task.answer_key(t, ex) for t in finals]
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
    codec = PromptCodec(model.tokenizer, task, cfg.task.framing)
    e = cfg.eval
    sampling = dataclasses.replace(cfg.sampling, greedy=system.greedy, temperature=e.temperature)
    trained = system.trained and adapters is not None
    spec = ExpansionSpec(n=system.votes, m=1, l=1, depth=system.depth, max_new=cfg.sampling.budgets(e.max_new_tokens),
                         sampling=sampling, stop=codec.stop, mode="fork" if trained else "extend")
    ads = tuple(adapters[r] for r in ROLES) if trained else (None, None, None)
    rows = []

    def on_batch(b: int, arrays: dict) -> None:
        texts = decode_tree(codec, arrays, ROLES[: system.depth])
        for q, i in enumerate(arrays["index"]):
            rows.append(_score(system, task, examples[i], {r: texts[r][q].reshape(-1).tolist() for r in texts}))

    # as many batches as batch_questions asks for, of equal size (no batch mostly padding)
    most = max(1, min(len(examples), e.batch_questions or len(examples)))
    batch = -(-len(examples) // -(-len(examples) // most))
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


_VERDICT_LINE = re.compile(r"verdict\s*[:：]", re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"(?:the\s+)?correct\s+answer\s+is|final\s+answer", re.IGNORECASE)
_STATED = re.compile(r"correct\s+answer\s+is\s*:?", re.IGNORECASE)


def _stated_answer(task: Task, critique: str, example: Example) -> str | None:
    """The answer a critique states: the first sentence after "the correct answer is" (else
    its final answer, e.g. a ``Final Answer:`` line), as ``task.answer_key``."""
    m = _STATED.search(critique)
    if m:
        sentence = re.split(r"\n|\.\s|,\s", critique[m.end():].strip(), maxsplit=1)[0]
        return task.answer_key("Final Answer: " + sentence, example)
    return task.answer_key(critique, example)


def critique_verdict(task: Task, critique: str, answer: str, example: Example) -> bool | None:
    """What a critique says of the answer it checked: True (correct), False (incorrect), None.

    An explicit ``Verdict:`` line decides; else a critique that states an answer of its own
    ("The correct answer is 12." -- the first sentence after that phrase) agrees iff that answer
    has the checked answer's key (``task.answer_key``); else the first verdict word ("correct",
    "incorrect", "wrong"), with answer-announcing phrases such as "the correct answer is" ignored.
    """
    from malt_jax.evaluate import parse_verdict

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
    from malt_jax.evaluate import verifier_confusion

    right, said = [], []
    for ex, r in zip(examples, rows, strict=True):
        for g, v in zip(r["texts"]["G"], r["texts"]["V"], strict=True):
            right.append(bool(task.grade_example(g, ex)))
            said.append(critique_verdict(task, v, g, ex))
    return verifier_confusion(right, said)


def run_eval(cfg: RunConfig, model: Model, task: Task, examples: Sequence[Example], run_dir: Path,
             adapters: dict[str, Params] | None, systems: Sequence[System] | None = None,
             progress: bool = True, mesh=None, sft_adapters: dict[str, Params] | None = None,
             out: Path | None = None) -> dict:
    """Stage 4: every system on the held-out questions, paired statistics, verifier verdicts.

    ``adapters`` / ``sft_adapters``: the roles' adapters after DPO / after SFT only (systems
    that need missing adapters are skipped). Returns ``results`` (name -> SystemResult),
    ``comparisons`` (every trained system vs every baseline, and MALT vs the SFT-only chain; the
    pre-declared primary comparison, :func:`primary_names`, is marked ``primary`` and the others
    carry Holm-adjusted p-values ``p_holm``) and ``verifier`` (chain name -> verdict confusion).
    """
    from malt_jax.evaluate import compare, holm

    out = out or run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    systems = list(systems or default_systems(cfg.eval.votes, cfg.eval.sft_chain))
    by_stage = {"final": adapters, "sft": sft_adapters}
    # A single-model system whose samples are an untrained chain's generator level is scored
    # from that chain's texts: the chain runs first and the single model is not sampled again.
    source = {s.name: next((c for c in systems if _shares_generator(s, c)), None) for s in systems}
    order = sorted(systems, key=lambda s: source[s.name] is not None)
    results, trained_names, all_rows, verifier = {}, [], {}, {}
    for sys_ in order:
        ads = by_stage.get(sys_.stage) if sys_.trained else None
        if sys_.trained and ads is None:
            continue
        path = out / f"{sys_.name}.jsonl"
        chain = source[sys_.name]
        if chain is not None and _read_rows(path, len(examples)) is None:
            rows = derive_single(sys_, all_rows[chain.name], task, examples, path)
        else:
            rows = evaluate_system(sys_, cfg, model, task, examples, ads, path, progress, mesh=mesh)
        all_rows[sys_.name] = rows
        if sys_.depth == 3:
            verifier[sys_.name] = verifier_stats(task, examples, rows)
    for sys_ in systems:  # the report lists systems in the given order
        if sys_.name in all_rows:
            res = system_results(sys_, all_rows[sys_.name])
            results.update(res)
            if sys_.trained:
                trained_names += list(res)
    baselines = [n for n in results if n not in trained_names]
    comparisons = []
    for target in trained_names:
        others = baselines + [n for n in trained_names if target.startswith("malt") and n.startswith("sft-chain")
                              and n.endswith(target[len("malt"):]) and ("+MV" in n) == ("+MV" in target)]
        comparisons += compare(results, target, others, cfg.eval.bootstrap_samples, cfg.eval.seed)
    primary = primary_names(cfg.eval.votes)
    for c in comparisons:
        c["primary"] = (c["target"], c["baseline"]) == primary
    rest = [c for c in comparisons if not c["primary"]]
    for c, p in zip(rest, holm([c["mcnemar_p"] for c in rest])):
        c["p_holm"] = p
    for c in comparisons:
        if c["primary"]:
            c["p_holm"] = c["mcnemar_p"]
    return {"results": results, "comparisons": comparisons, "verifier": verifier}


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
        model: Model | None = None, task: Task | None = None, command: str = "") -> dict:
    """Runs the MALT pipeline (each stage resumable) and writes the report and ``summary.json``
    (also to ``<cfg.results>/<name>.json`` when ``results`` is set); returns a summary."""
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
        from malt_jax.sharding import mesh_context

        t = time.perf_counter()
        with mesh_context(mesh):  # every stage's jitted calls see the mesh (activation constraints)
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
    if "train" in stages:
        timed("train", lambda: run_train(cfg, model, run_dir, mesh=mesh, progress=progress))
    adapters, sft_adapters = load_adapters(run_dir)
    if "eval" in stages:
        ev = timed("eval", lambda: run_eval(cfg, model, task, evals, run_dir, adapters, progress=progress,
                                            mesh=mesh, sft_adapters=sft_adapters))
        if credit_summary is None and (run_dir / "credit" / "summary.json").exists():
            credit_summary = json.loads((run_dir / "credit" / "summary.json").read_text())
        meta = {"model": cfg.weights, "task": cfg.task.name, "n_questions": len(evals),
                "train questions": len(train), "framing": cfg.task.framing,
                "tree": f"{cfg.tree.n}x{cfg.tree.m}x{cfg.tree.l}",
                "seeds": f"split {cfg.task.seed}, train {cfg.train.seed}, eval {cfg.eval.seed}",
                "config_hash": cfg.hash(), "wall_times": dict(timings)}
        epochs = {}
        for r in ROLES:
            p = run_dir / "adapters" / f"{r}_epochs.jsonl"
            if p.exists():
                epochs[r] = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        report = run_dir / "report.md"
        if is_lead():
            write_report(run_dir, ev["results"], ev["comparisons"], credit_summary, meta, verifier=ev["verifier"],
                         epochs_by_role=epochs, training_counts=training_counts(run_dir))
        summary.update(table=format_table(ev["results"]), report=str(report), comparisons=ev["comparisons"],
                       verifier=ev["verifier"])
        from malt_jax.summary import experiment_summary

        record = experiment_summary(cfg.name, command, cfg.hash(), ev, run_dir, len(train), len(evals), cfg.eval.votes,
                                    primary_names(cfg.eval.votes), sum(timings.values()), credit=credit_summary,
                                    timings_s=dict(timings))
        _write_atomic(run_dir / "summary.json", json.dumps(record, indent=2) + "\n")
        if is_lead() and tblog.write_eval(run_dir, record["systems"], record["verifier"]):
            summary["tensorboard"] = tblog.command(run_dir)
        if cfg.results:
            Path(cfg.results).mkdir(parents=True, exist_ok=True)
            _write_atomic(Path(cfg.results) / f"{cfg.name}.json", json.dumps(record, indent=2) + "\n")
    summary["timings"] = timings
    return summary
