"""Token-level training examples and their packing into fixed-shape NumPy batches.

The sampler produces token ids, so examples are token lists and are never re-tokenized:

* :class:`SFTExample` ``(prompt, completion)`` — a positive trajectory for one role;
* :class:`DPOExample` ``(prompt, chosen, rejected)`` — a preference pair.

Packing (``pack_sft`` / ``pack_dpo``) right-pads every row of a batch to a *length bucket*
(next power of two >= 16 up to 128, then multiples of 64; capped at ``max_seq_len``) so a run compiles only a handful of
shapes. A row holds ``seq = prompt + completion``; with the usual shift

    tokens[t] = seq[t]        targets[t] = seq[t + 1]        loss_mask[t] = 1 iff seq[t + 1] is a completion token

so ``logits = forward(tokens)`` lines up with ``targets`` (``losses.py``'s convention). Sequences
longer than ``max_seq_len`` lose prompt tokens from the LEFT; completion tokens are only dropped
(from the END) when the completion alone does not fit (one prompt token is kept, when there is
one, so the first completion token still has a context to be predicted from).

Batches have a fixed number of rows: :func:`epoch_batches` pads the last partial batch with
``None`` slots that pack as all-padding rows of weight 0 (they count for nothing), instead of
dropping examples. Batch order is a deterministic function of ``(seed, epoch)``, and an epoch
can be resumed at any batch index (``start``), which makes checkpoint restarts exact.

DPO batches interleave the two sequences of a pair, ``[c0, r0, c1, r1, ...]`` (shape
``[2B, T]``): one forward pass scores both, and every shard/microbatch of consecutive rows
holds whole pairs. :func:`pack_dpo_shared` packs a pair into *one* row instead, its prompt
once: ``prompt + chosen + rejected`` with segment ids (the rejected completion does not see
the chosen one) and positions restarting after the prompt, so each completion is scored
exactly as in its own row, for ``len(prompt)`` fewer tokens per pair.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np

__all__ = [
    "SFTExample",
    "DPOExample",
    "truncate",
    "bucket_length",
    "pack_sft",
    "pack_dpo",
    "pack_dpo_shared",
    "pack",
    "completion_index",
    "score_width",
    "num_batches",
    "epoch_order",
    "epoch_batches",
    "gather",
    "batches",
    "MIN_BUCKET",
]

MIN_BUCKET = 16

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """A prompt and the completion the role should learn to produce (token ids)."""

    prompt: Sequence[int]
    completion: Sequence[int]
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DPOExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) completion."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]
    weight: float = 1.0


def truncate(prompt: Sequence[int], completion: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Fits ``prompt + completion`` into ``max_len`` tokens.

    The prompt loses tokens from the left; if the completion alone is too long, one prompt
    token (when there is one) is kept and the completion's end is cut.
    """
    prompt, completion = list(prompt), list(completion)
    if max_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_len}")
    if len(prompt) + len(completion) <= max_len:
        return prompt, completion
    keep_prompt = max_len - len(completion)
    if keep_prompt >= min(1, len(prompt)):
        return prompt[len(prompt) - keep_prompt :] if keep_prompt else [], completion
    keep_prompt = min(1, len(prompt))
    return prompt[len(prompt) - keep_prompt :], completion[: max_len - keep_prompt]


def bucket_length(n: int, max_len: int, min_bucket: int = MIN_BUCKET, step: int = 64) -> int:
    """Padded row length for ``n`` tokens, <= max_len: the next power of two >= max(n, min_bucket)
    up to 128, then the next multiple of ``step`` (at most ``step`` padding tokens on long rows;
    a handful of shapes per run)."""
    b = max(min_bucket, 1 << max(0, math.ceil(math.log2(max(n, 1))))) if n <= 128 else -(-n // step) * step
    return int(min(b, max_len))


def _rows(seqs: list[tuple[list[int], list[int]]], T: int, pad_id: int) -> tuple[np.ndarray, ...]:
    n = len(seqs)
    tokens = np.full((n, T), pad_id, np.int32)
    targets = np.full((n, T), pad_id, np.int32)
    mask = np.zeros((n, T), np.float32)
    for i, (p, c) in enumerate(seqs):
        seq = p + c
        L = len(seq) - 1  # number of (input, target) positions
        if L <= 0:
            continue
        tokens[i, :L] = seq[:-1]
        targets[i, :L] = seq[1:]
        start = max(len(p) - 1, 0)  # position whose target is the first completion token
        mask[i, start:L] = 1.0
    return tokens, targets, mask


def pack_sft(examples: Sequence[SFTExample | None], max_len: int, pad_id: int = 0, length: int | None = None) -> Batch:
    """Packs SFT examples (``None`` = a padding row) into a batch.

    Returns ``{"tokens", "targets": int32[B, T], "loss_mask": float32[B, T] (already multiplied
    by the example weight; 0 on prompt and padding), "weights": float32[B]}``. ``T`` is the
    bucket of the longest row unless ``length`` is given.
    """
    seqs: list[tuple[list[int], list[int]]] = []
    weights: list[float] = []
    for ex in examples:
        if ex is None:
            seqs.append(([], []))
            weights.append(0.0)
        else:
            seqs.append(truncate(ex.prompt, ex.completion, max_len))
            weights.append(float(ex.weight))
    longest = max((len(p) + len(c) - 1 for p, c in seqs), default=1)
    T = length or bucket_length(longest, max_len)
    tokens, targets, mask = _rows(seqs, T, pad_id)
    w = np.asarray(weights, np.float32)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask * w[:, None], "weights": w}


def pack_dpo(examples: Sequence[DPOExample | None], max_len: int, pad_id: int = 0, length: int | None = None) -> Batch:
    """Packs preference pairs (``None`` = padding pair) into an interleaved batch.

    Returns ``{"tokens", "targets": int32[2B, T], "loss_mask": float32[2B, T] (0/1),
    "weights": float32[B]}``; rows ``2i`` / ``2i + 1`` are pair ``i``'s chosen / rejected. The
    prompt is truncated once so that the longer of the two completions fits.
    """
    seqs: list[tuple[list[int], list[int]]] = []
    weights: list[float] = []
    for ex in examples:
        if ex is None:
            seqs += [([], []), ([], [])]
            weights.append(0.0)
            continue
        longer = ex.chosen if len(ex.chosen) >= len(ex.rejected) else ex.rejected
        p, _ = truncate(ex.prompt, longer, max_len)
        for c in (ex.chosen, ex.rejected):
            seqs.append(truncate(p, c, max_len))
        weights.append(float(ex.weight))
    longest = max((len(p) + len(c) - 1 for p, c in seqs), default=1)
    T = length or bucket_length(longest, max_len)
    tokens, targets, mask = _rows(seqs, T, pad_id)
    return {"tokens": tokens, "targets": targets, "loss_mask": mask, "weights": np.asarray(weights, np.float32)}


def score_width(n: int, cap: int) -> int:
    """Scored positions per row for at most ``n`` scored tokens: the next power of two up to 32,
    then the next multiple of 32, at most ``cap`` (few compiled shapes, little LM-head waste)."""
    w = max(8, 1 << max(0, math.ceil(math.log2(max(n, 1))))) if n <= 32 else -(-n // 32) * 32
    return int(min(w, cap))


# Segment ids of a shared-prompt DPO row (``pack_dpo_shared``); llama.attention lets every
# segment see segment 0 and otherwise only its own.
SEG_PROMPT, SEG_CHOSEN, SEG_REJECTED, SEG_PAD = 0, 1, 2, 3


def pack_dpo_shared(
    examples: Sequence[DPOExample | None], max_len: int, pad_id: int = 0, length: int | None = None
) -> Batch:
    """Packs preference pairs into one row per pair, the prompt stored once.

    Row ``i`` holds ``prompt + chosen[:-1] + rejected[:-1]`` (a completion's last token is only
    ever a target). Returns ``{"tokens", "positions", "segments": int32[B, T],
    "score_index", "score_targets": int32[B, 2, C], "score_mask": float32[B, 2, C],
    "weights": float32[B]}``: ``positions`` restart at ``len(prompt)`` for the rejected
    completion, ``segments`` are ``SEG_PROMPT/SEG_CHOSEN/SEG_REJECTED/SEG_PAD``, and
    ``score_index[i, 0 | 1]`` are the row positions whose next-token predictions score the
    chosen / rejected completion (the last prompt position predicts both first tokens), with
    ``score_targets`` the tokens they predict and ``score_mask`` 1 on real ones. Truncation is
    ``pack_dpo``'s, so every completion gets the same log-probability as in ``pack_dpo``'s rows.
    ``T`` is the bucket (multiples of 32 beyond 128 tokens) of the longest row, at most
    ``2 * max_len``, unless ``length`` is given; ``C`` is :func:`score_width` of the longest
    completion.
    """
    parts: list[tuple[list[int], list[int], list[int]]] = []
    weights: list[float] = []
    for ex in examples:
        if ex is None:
            parts.append(([], [], []))
            weights.append(0.0)
            continue
        longer = ex.chosen if len(ex.chosen) >= len(ex.rejected) else ex.rejected
        p, _ = truncate(ex.prompt, longer, max_len)  # then both completions fit after p (as in pack_dpo)
        parts.append((p, truncate(p, ex.chosen, max_len)[1], truncate(p, ex.rejected, max_len)[1]))
        weights.append(float(ex.weight))
    B = len(parts)
    longest = max((len(p) + max(len(c) - 1, 0) + max(len(r) - 1, 0) for p, c, r in parts), default=1)
    T = length or bucket_length(longest, 2 * max_len, step=32)
    if longest > T:
        raise ValueError(f"pack_dpo_shared: a pair needs {longest} tokens, more than length={T}")
    C = score_width(max((max(len(c), len(r)) for _, c, r in parts), default=1), T)
    tokens = np.full((B, T), pad_id, np.int32)
    positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
    segments = np.full((B, T), SEG_PAD, np.int32)
    index = np.zeros((B, 2, C), np.int32)
    targets = np.full((B, 2, C), pad_id, np.int32)
    mask = np.zeros((B, 2, C), np.float32)
    for i, (p, c, r) in enumerate(parts):
        if not (c and r):
            continue
        P, nc, nr = len(p), len(c) - 1, len(r) - 1
        row = p + c[:-1] + r[:-1]
        tokens[i, : len(row)] = row
        segments[i, :P] = SEG_PROMPT
        segments[i, P : P + nc] = SEG_CHOSEN
        segments[i, P + nc : P + nc + nr] = SEG_REJECTED
        positions[i, P + nc : P + nc + nr] = np.arange(P, P + nr)
        last = max(P - 1, 0)  # predicts the first token of both completions
        for j, (comp, start) in enumerate(((c, P), (r, P + nc))):
            # with an empty prompt the first completion token is not predicted (as in pack_dpo)
            pred = ([last] if P else []) + list(range(start, start + len(comp) - 1))
            tgt = comp if P else comp[1:]
            index[i, j, : len(pred)] = pred
            targets[i, j, : len(tgt)] = tgt
            mask[i, j, : len(tgt)] = 1.0
    return {
        "tokens": tokens,
        "positions": positions,
        "segments": segments,
        "score_index": index,
        "score_targets": targets,
        "score_mask": mask,
        "weights": np.asarray(weights, np.float32),
    }


def pack(
    examples: Sequence[SFTExample | DPOExample | None],
    max_len: int,
    pad_id: int = 0,
    length: int | None = None,
    shared_prompt: bool = False,
) -> Batch:
    """``pack_sft`` or ``pack_dpo`` (``pack_dpo_shared`` with ``shared_prompt``) depending on the
    example type."""
    kind = next((type(e) for e in examples if e is not None), SFTExample)
    if kind is DPOExample:  # a batch holds one kind of example
        packer = pack_dpo_shared if shared_prompt else pack_dpo
        return packer(cast(Sequence[DPOExample | None], examples), max_len, pad_id, length)
    return pack_sft(cast(Sequence[SFTExample | None], examples), max_len, pad_id, length)


def completion_index(loss_mask: np.ndarray, min_width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The scored (``loss_mask > 0``) positions of each row: ``index`` int32[B, C] (padded with
    0) and ``valid`` float32[B, C], ``C`` = the most scored positions of a row rounded up to a
    power of two (>= ``min_width``, <= T), so a run compiles few shapes. Scoring only these
    positions gives the same losses as scoring every position (the others have mask 0) at a
    fraction of the LM-head cost."""
    m = np.asarray(loss_mask) > 0
    B, T = m.shape
    n = int(m.sum(axis=1).max(initial=0))
    C = min(T, max(min_width, 1 << max(0, math.ceil(math.log2(max(n, 1))))))
    index = np.zeros((B, C), np.int32)
    valid = np.zeros((B, C), np.float32)
    for b in range(B):
        pos = np.flatnonzero(m[b])
        index[b, : len(pos)] = pos
        valid[b, : len(pos)] = 1.0
    return index, valid


def num_batches(n_examples: int, batch_size: int) -> int:
    """Batches per epoch (the last partial one is padded, never dropped)."""
    return -(-n_examples // batch_size)


def epoch_order(n_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation determined by ``(seed, epoch)`` only."""
    if not shuffle:
        return np.arange(n_examples)
    return np.random.default_rng([seed, epoch]).permutation(n_examples)


def epoch_batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(batch_index, example_indices[batch_size])`` from batch ``start`` on.

    Indices of ``-1`` mark padding slots of the last partial batch.
    """
    order = epoch_order(n_examples, seed, epoch, shuffle)
    nb = num_batches(n_examples, batch_size)
    padded = np.full(nb * batch_size, -1, np.int64)
    padded[:n_examples] = order
    for b in range(start, nb):
        yield b, padded[b * batch_size : (b + 1) * batch_size]


def gather(examples: Sequence, idx: np.ndarray) -> list:
    """``[examples[i] or None for padding (-1)]``."""
    return [examples[i] if i >= 0 else None for i in idx]


def batches(
    examples: Sequence[SFTExample | DPOExample],
    batch_size: int,
    max_len: int,
    seed: int,
    epoch: int,
    start: int = 0,
    pad_id: int = 0,
    shuffle: bool = True,
    shared_prompt: bool = False,
) -> Iterator[tuple[int, np.ndarray, Batch]]:
    """Packed batches of one epoch from batch ``start`` on: ``(batch_index, example_indices, batch)``.

    Every batch has ``batch_size`` rows (pairs for DPO); the last one is padded with weight-0 rows.
    ``shared_prompt``: DPO pairs as ``pack_dpo_shared`` rows.
    """
    for b, idx in epoch_batches(len(examples), batch_size, seed, epoch, start, shuffle):
        yield b, idx, pack(gather(examples, idx), max_len, pad_id, shared_prompt=shared_prompt)
