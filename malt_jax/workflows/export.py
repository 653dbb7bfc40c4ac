"""Role adapters to and from the Hugging Face ecosystem: PEFT LoRA folders and merged checkpoints.

A malt-jax adapter ``{"layers": {name: {"a": [k, in, r], "b": [k, r, out]}}}`` (the top ``k``
layers, or all) with scale ``alpha / r`` is exactly a PEFT LoRA adapter with ``lora_A.weight =
a[i].T`` (r, in), ``lora_B.weight = b[i].T`` (out, r) and ``lora_alpha = alpha`` on the
Hugging Face modules of :data:`HF_MODULES`; weights are in Hugging Face's (rotate-half) Q/K row
order, as ``weights.py`` loads them from GGUF files too.

    malt-jax export RUN_DIR OUT --format peft|merged|both

writes ``OUT/base`` (the base model as a Hugging Face checkpoint with its tokenizer) and, per
role, ``OUT/<role>`` (a PEFT adapter folder whose ``base_model_name_or_path`` is ``OUT/base``)
and/or ``OUT/<role>-merged`` (a full checkpoint with the adapter folded in).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from malt_jax.config import LoraConfig, ModelConfig, run_config_of
from malt_jax.model.llama import Params
from malt_jax.model.weights import _LAYER_NAMES, WeightError
from malt_jax.stages.rundir import write_atomic

__all__ = ["HF_MODULES", "peft_config", "peft_tensors", "save_peft", "load_peft", "export_run"]

#: our weight name -> Hugging Face module path inside a decoder layer
HF_MODULES = {ours: hf.removesuffix(".weight") for ours, (hf, _) in _LAYER_NAMES.items() if ours.startswith("w")}
_BY_LEAF = {hf.rsplit(".", 1)[1]: ours for ours, hf in HF_MODULES.items()}  # "q_proj" -> "wq"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight$")


def _first_layer(cfg: ModelConfig, lora_cfg: LoraConfig) -> int:
    return cfg.n_layers - lora_cfg.top_layers if lora_cfg.top_layers else 0


def peft_config(cfg: ModelConfig, lora_cfg: LoraConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter equal to ours."""
    first = _first_layer(cfg, lora_cfg)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg.rank,
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(HF_MODULES[t].rsplit(".", 1)[1] for t in lora_cfg.targets),
        "layers_to_transform": list(range(first, cfg.n_layers)) if lora_cfg.top_layers else None,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def peft_tensors(adapter: Params, cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT ``adapter_model.safetensors`` tensors (float32) of ``adapter``."""
    first = _first_layer(cfg, lora_cfg)
    out: dict[str, np.ndarray] = {}
    for name, ab in adapter["layers"].items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(a.shape[0]):
            key = f"base_model.model.model.layers.{first + i}.{HF_MODULES[name]}"
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def save_peft(
    adapter: Params, cfg: ModelConfig, lora_cfg: LoraConfig, out_dir: str | Path, base_model_name_or_path: str = ""
) -> Path:
    """Writes a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.numpy import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # each file atomically; the config last, so a folder with a config has its tensors
    tensors = save(peft_tensors(adapter, cfg, lora_cfg))
    write_atomic(out / "adapter_model.safetensors", lambda f: f.write(tensors))
    config = json.dumps(peft_config(cfg, lora_cfg, base_model_name_or_path), indent=2)
    write_atomic(out / "adapter_config.json", config)
    return out


#: adapter_config.json fields that change what the adapter computes and have no malt-jax
#: equivalent when set (to anything but these "unset" values)
_UNSUPPORTED_SET = {
    "layer_replication": "layer replication (a model with repeated layers) is not supported",
    "exclude_modules": "excluded modules are not supported (name the adapted modules in target_modules)",
    "modules_to_save": "fully trained extra modules (modules_to_save) are not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "rank_pattern": "per-module ranks/alphas are not supported",
    "alpha_pattern": "per-module ranks/alphas are not supported",
}
#: boolean fields malt-jax reads (JSON true/false or absent; "false" is not false); those whose
#: true value has no malt-jax equivalent
_BOOL_FIELDS = ("use_dora", "fan_in_fan_out", "lora_bias", "use_rslora")
_UNSUPPORTED_TRUE = {
    "use_dora": "DoRA is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) is not supported",
    "lora_bias": "LoRA biases are not supported",
}


def load_peft(adapter_dir: str | Path, cfg: ModelConfig) -> tuple[Params, LoraConfig]:
    """A PEFT LoRA adapter folder as a malt-jax adapter and its :class:`LoraConfig` (for example to
    start a run's role from it). Refuses, naming the field and the file, what has no malt-jax
    equivalent: another PEFT type, biases, DoRA, per-module ranks, layers that are not all the
    model's or a top block, modules other than the attention/MLP projections."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    d = Path(adapter_dir)
    cpath, wpath = d / "adapter_config.json", d / "adapter_model.safetensors"
    for p in (cpath, wpath):
        if not p.is_file():
            raise WeightError(
                f"{p}: missing (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)"
            )
    try:
        c = json.loads(cpath.read_text())
    except json.JSONDecodeError as e:
        raise WeightError(f"{cpath}: invalid JSON at line {e.lineno}: {e.msg}") from None

    if not isinstance(c, dict):
        raise WeightError(f"{cpath}: expected a JSON object, got {type(c).__name__}")

    def refuse(field: str, why: str) -> WeightError:
        return WeightError(f"{cpath}: {field} = {c.get(field)!r}: {why}")

    if c.get("peft_type") != "LORA":
        raise refuse("peft_type", "only LORA adapters are supported")
    if c.get("bias", "none") != "none":
        raise refuse("bias", "LoRA biases are not supported (use bias: none)")
    for field in _BOOL_FIELDS:
        if c.get(field) is not None and not isinstance(c[field], bool):
            raise refuse(field, "expected true or false")
    for field, why in _UNSUPPORTED_TRUE.items():
        if c.get(field):
            raise refuse(field, why)
    for field, why in _UNSUPPORTED_SET.items():
        if c.get(field) not in (None, [], {}, ""):
            raise refuse(field, why)
    r, alpha = c.get("r"), c.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise refuse("r", "must be an int >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise refuse("lora_alpha", "must be a finite number > 0")
    alpha = float(alpha) * (r**0.5 if c.get("use_rslora") else 1.0)  # rsLoRA scale alpha/sqrt(r) = alpha'/r
    tensors = load_file(str(wpath))
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise WeightError(f"{wpath}: tensor {key!r} is not a LoRA A/B weight of a decoder layer projection")
        layer, leaf, ab = int(m.group(1)), m.group(3), m.group(4)
        if leaf not in _BY_LEAF or HF_MODULES[_BY_LEAF[leaf]] != f"{m.group(2)}.{leaf}":
            raise WeightError(
                f"{wpath}: tensor {key!r}: module {m.group(2)}.{leaf} has no malt-jax LoRA target "
                f"(supported: {', '.join(sorted(HF_MODULES.values()))})"
            )
        found.setdefault((_BY_LEAF[leaf], layer), {})[ab] = value
    if not found:
        raise WeightError(f"{wpath}: no LoRA tensors")
    targets = tuple(t for t in HF_MODULES if any(k[0] == t for k in found))
    layers = sorted({k[1] for k in found})
    # the config's module and layer lists must describe the tensors (PEFT applies what the config
    # names: tensors outside it would be ignored there and applied here)
    tm = c.get("target_modules")
    if isinstance(tm, list):
        leaves = sorted(HF_MODULES[t].rsplit(".", 1)[1] for t in targets)
        names = sorted({str(x).rsplit(".", 1)[-1] for x in tm})
        if names != leaves:
            raise refuse("target_modules", f"disagrees with the tensors of {wpath.name} (modules {leaves})")
    elif tm is not None and not isinstance(tm, str):
        raise refuse("target_modules", "expected a list of module names or a string")
    ltt = c.get("layers_to_transform")
    if ltt is not None:
        want = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
        if not isinstance(want, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in want):
            raise refuse("layers_to_transform", "expected null, an int or a list of ints")
        if sorted(set(want)) != layers:
            raise refuse(
                "layers_to_transform", f"disagrees with the tensors of {wpath.name} (layers {layers[0]}..{layers[-1]})"
            )
    if layers[-1] >= cfg.n_layers:
        raise WeightError(f"{wpath}: layer {layers[-1]} does not exist in a {cfg.n_layers}-layer model")
    if layers != list(range(layers[0], cfg.n_layers)):
        raise WeightError(
            f"{wpath}: adapted layers {layers[0]}..{layers[-1]} are not the model's top layers "
            "(malt-jax adapts all layers or a top block, lora.top_layers)"
        )
    top = 0 if layers[0] == 0 else cfg.n_layers - layers[0]
    lora_cfg = LoraConfig(rank=r, alpha=alpha, targets=targets, top_layers=top)
    from malt_jax.model.lora import adapter_shapes

    shapes = adapter_shapes(cfg, lora_cfg)["layers"]
    adapter: dict[str, dict[str, Any]] = {}
    for t in targets:
        a_s, b_s = [], []
        for layer in layers:
            ab = found.get((t, layer), {})
            if set(ab) != {"A", "B"}:
                raise WeightError(
                    f"{wpath}: layer {layer} {HF_MODULES[t]}: lora_A and lora_B are both needed "
                    f"(every adapted module must be in every adapted layer)"
                )
            a_s.append(ab["A"].T)
            b_s.append(ab["B"].T)
        a, b = np.stack(a_s).astype(np.float32), np.stack(b_s).astype(np.float32)
        if a.shape != shapes[t]["a"] or b.shape != shapes[t]["b"]:
            raise WeightError(
                f"{wpath}: {HF_MODULES[t]}: LoRA shapes A{a.shape[1:][::-1]} B{b.shape[1:][::-1]} do "
                f"not fit this model (expected A{shapes[t]['a'][1:][::-1]} B{shapes[t]['b'][1:][::-1]})"
            )
        adapter[t] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    return {"layers": adapter}, lora_cfg


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "peft", stage: str = "final") -> dict[str, Path]:
    """Exports a run's role adapters (``stage`` "final" or "sft"); returns name -> folder."""
    from malt_jax.model.lora import lora_scale, merge
    from malt_jax.model.weights import save_hf
    from malt_jax.workflows import pipeline

    if fmt not in ("peft", "merged", "both"):
        raise ValueError(f"--format must be peft, merged or both, got {fmt!r}")
    if stage not in ("final", "sft"):
        raise ValueError(f"--stage must be final or sft, got {stage!r}")
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    cfg = run_config_of(run_dir)
    final, sft = pipeline.load_adapters(run_dir)
    adapters = final if stage == "final" else sft
    if adapters is None:
        raise FileNotFoundError(
            f"{run_dir / 'adapters'}: no trained role adapters "
            f"(G/V/R{'' if stage == 'final' else '_sft'}.safetensors); run the train stage first"
        )
    model = pipeline.load_model(cfg.weights, cfg.model)
    # everything is written into a temporary sibling folder, moved to OUT at the end: a failure
    # leaves no partial output, and an existing OUT as it was
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    names: list[str] = ["base"]
    try:
        base_dir = save_hf(model.params, model.cfg, tmp / "base")
        model.tokenizer.save(base_dir)
        base_path = str((out / "base").resolve())  # where the base model will be
        for role, adapter in adapters.items():
            if fmt in ("peft", "both"):
                save_peft(adapter, model.cfg, cfg.lora, tmp / role, base_path)
                names.append(role)
            if fmt in ("merged", "both"):
                d = save_hf(merge(model.params, adapter, lora_scale(cfg.lora)), model.cfg, tmp / f"{role}-merged")
                model.tokenizer.save(d)
                names.append(f"{role}-merged")
        _move_into(tmp, out, names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: out / name for name in names}


def _move_into(tmp: Path, out: Path, names: list[str]) -> None:
    """Moves the finished folders ``tmp/<name>`` to ``out``: renames ``tmp`` to ``out`` when there
    is no ``out``; else replaces ``out``'s entries of those names (other files stay), restoring
    them if a rename fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = tmp / ".replaced"
    old.mkdir()
    done: list[tuple[str, bool]] = []  # (name, whether out had one, now in old/)
    try:
        for name in names:
            had = (out / name).exists() or (out / name).is_symlink()
            if had:
                os.replace(out / name, old / name)
            done.append((name, had))
            os.replace(tmp / name, out / name)
    except BaseException:
        for name, had in reversed(done):
            if not (tmp / name).exists() and (out / name).is_dir() and not (out / name).is_symlink():
                shutil.rmtree(out / name)  # the new one, already moved in
            if had:
                os.replace(old / name, out / name)
        raise
