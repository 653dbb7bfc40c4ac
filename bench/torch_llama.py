"""The testbed's pretraining step in plain PyTorch: the peer side of bench/pretrain_vs_torch.py.

Runs in the peers env (``.venv-peers``: torch and numpy only, no jax, no malt_jax), started by
``pretrain_vs_torch.py`` as a worker process that stays alive for the whole comparison and is
driven over stdin / stdout (one JSON line each way), so the two frameworks' repetitions can be
interleaved while each runs in its own interpreter::

    .venv-peers/bin/python bench/torch_llama.py WORKDIR THREADS
    stdin:  {"cmd": "parity", "lr": ...} | {"cmd": "steps" | "grad" | "forward", "n": N} | {"cmd": "peak", "n": 2048}
            | {"cmd": "threads", "n": 1} | {"cmd": "quit"}
    stdout: one JSON object per command

``WORKDIR/init.npz`` holds the model config (``cfg``, JSON), the batch (``rows``, ``[B, T + 1]``)
and the JAX parameters under their ``malt_jax.model.llama`` names and layouts (``layers/wq``:
``[L, in, out]``, ...). The module below is a hand-written Llama computing what
``llama.forward`` computes for a plain causal batch: RMSNorm (f32, eps ``norm_eps``),
rotate-half RoPE (``rope_theta``, positions ``0 .. T-1``), causal grouped-query attention (query
head ``h`` reads KV head ``h // (H / K)``), a SwiGLU MLP ``w_down(silu(w_gate x) * w_up x)`` and an
LM head tied to the embedding when ``tie_embeddings`` (``x @ embed.T``). The optimizer is what
``training.pretrain.make_pretrain_optimizer`` builds: global-norm clipping, then AdamW with
b2 0.95, eps 1e-8 and weight decay on the matrices (projections, embedding, LM head) only; the
learning rate is constant here (the schedule changes no work).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROJ = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, heads, T, hd]; cos / sin [T, hd / 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        D, H, K, hd, Fh = c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"]
        self.H, self.K, self.hd = H, K, hd
        self.attn_norm, self.mlp_norm = RMSNorm(D, c["norm_eps"]), RMSNorm(D, c["norm_eps"])
        self.wq, self.wk, self.wv = (
            nn.Linear(D, H * hd, bias=False),
            nn.Linear(D, K * hd, bias=False),
            nn.Linear(D, K * hd, bias=False),
        )
        self.wo = nn.Linear(H * hd, D, bias=False)
        self.w_gate, self.w_up = nn.Linear(D, Fh, bias=False), nn.Linear(D, Fh, bias=False)
        self.w_down = nn.Linear(Fh, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        a = self.attn_norm(x)
        q = self.wq(a).view(B, T, self.H, self.hd).transpose(1, 2)
        k = self.wk(a).view(B, T, self.K, self.hd).transpose(1, 2)
        v = self.wv(a).view(B, T, self.K, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.K != self.H:  # grouped-query attention: query head h reads KV head h // G
            k, v = k.repeat_interleave(self.H // self.K, dim=1), v.repeat_interleave(self.H // self.K, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, self.H * self.hd))
        m = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(m)) * self.w_up(m))


class Llama(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["dim"])
        self.layers = nn.ModuleList(Block(c) for _ in range(c["n_layers"]))
        self.final_norm = RMSNorm(c["dim"], c["norm_eps"])
        self.lm_head = None if c["tie_embeddings"] else nn.Linear(c["dim"], c["vocab_size"], bias=False)
        hd = c["head_dim"]
        self.inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        ang = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.final_norm(x)
        return x @ self.embed.weight.T if self.lm_head is None else self.lm_head(x)

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        x, y = rows[:, :-1], rows[:, 1:]
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    # -- weights in malt_jax's names and layouts (linear weights [in, out], layers stacked) --

    def load_jax(self, p: dict) -> None:
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        with torch.no_grad():
            self.embed.weight.copy_(t(p["embed"]))
            self.final_norm.weight.copy_(t(p["final_norm"]))
            if self.lm_head is not None:
                self.lm_head.weight.copy_(t(p["lm_head"].T))
            for i, layer in enumerate(self.layers):
                layer.attn_norm.weight.copy_(t(p["layers/attn_norm"][i]))
                layer.mlp_norm.weight.copy_(t(p["layers/mlp_norm"][i]))
                for name in PROJ:
                    getattr(layer, name).weight.copy_(t(p[f"layers/{name}"][i].T))

    def export_jax(self, grads: bool = False) -> dict:
        """Parameters (or their gradients) in the names and layouts of ``load_jax``."""
        g = (lambda w: w.grad) if grads else (lambda w: w)  # noqa: E731
        n = lambda w: g(w).detach().numpy().copy()  # noqa: E731
        out = {"embed": n(self.embed.weight), "final_norm": n(self.final_norm.weight)}
        if self.lm_head is not None:
            out["lm_head"] = n(self.lm_head.weight).T
        out["layers/attn_norm"] = np.stack([n(lr.attn_norm.weight) for lr in self.layers])
        out["layers/mlp_norm"] = np.stack([n(lr.mlp_norm.weight) for lr in self.layers])
        for name in PROJ:
            out[f"layers/{name}"] = np.stack([n(getattr(lr, name).weight).T for lr in self.layers])
        return out


def make_optimizer(model: Llama, opt: dict) -> torch.optim.Optimizer:
    """AdamW as ``make_pretrain_optimizer`` (decay on matrices only); clipping is in ``train_step``."""
    decay = [p for name, p in model.named_parameters() if name.endswith(PROJ_SUFFIXES)]
    no_decay = [p for name, p in model.named_parameters() if not name.endswith(PROJ_SUFFIXES)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )


PROJ_SUFFIXES = tuple(f"{n}.weight" for n in PROJ) + ("embed.weight", "lm_head.weight")


def train_step(model: Llama, optim: torch.optim.Optimizer, rows: torch.Tensor, clip: float) -> float:
    optim.zero_grad(set_to_none=True)
    loss = model.loss(rows)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optim.step()
    return float(loss.detach())


def matmul_peak(n: int, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def main() -> None:
    work, threads = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    z = np.load(work / "init.npz")
    c = json.loads(str(z["cfg"]))
    opt = json.loads(str(z["opt"]))
    params = {k[2:]: z[k] for k in z.files if k.startswith("p/")}
    rows = torch.from_numpy(z["rows"].astype(np.int64))
    model = Llama(c)
    model.load_jax(params)
    model.train()
    optim = make_optimizer(model, opt)
    reply = lambda d: print(json.dumps(d), flush=True)  # noqa: E731
    reply(
        {
            "ready": True,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "n_params": sum(p.numel() for p in model.parameters()),
        }
    )
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "parity":  # loss and gradients at the JAX weights, then one optimizer step
            check = Llama(c)
            check.load_jax(params)
            loss = check.loss(rows)
            loss.backward()
            grads = check.export_jax(grads=True)
            o = make_optimizer(check, {**opt, "lr": msg["lr"]})
            torch.nn.utils.clip_grad_norm_(check.parameters(), opt["clip"])
            o.step()
            with torch.no_grad():
                after = float(check.loss(rows))
            np.savez(
                work / "torch_parity.npz",
                **{f"g/{k}": v for k, v in grads.items()},
                **{f"p/{k}": v for k, v in check.export_jax().items()},
            )
            reply({"loss": float(loss.detach()), "loss_after_step": after})
        elif cmd == "steps":
            times, losses = [], []
            for _ in range(msg["n"]):
                t0 = time.perf_counter()
                losses.append(train_step(model, optim, rows, opt["clip"]))
                times.append(time.perf_counter() - t0)
            reply({"times": times, "loss": losses[-1]})
        elif cmd == "forward":  # the loss alone, no autograd graph
            times = []
            with torch.no_grad():
                for _ in range(msg["n"]):
                    t0 = time.perf_counter()
                    model.loss(rows)
                    times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif cmd == "grad":  # loss and gradients, no clipping or optimizer step
            times = []
            for _ in range(msg["n"]):
                t0 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                model.loss(rows).backward()
                times.append(time.perf_counter() - t0)
            reply({"times": times})
        elif cmd == "threads":
            torch.set_num_threads(msg["n"])
            reply({"threads": torch.get_num_threads()})
        elif cmd == "peak":
            reply({"peak": matmul_peak(msg["n"])})
        elif cmd == "quit":
            reply({"bye": True})
            return
        else:
            reply({"error": f"unknown command {cmd!r}"})


if __name__ == "__main__":
    main()
