"""README "Library use": the example uses only names malt_jax exports, and runs (on a tiny random model)."""

import ast
import re
import types
from pathlib import Path

import malt_jax
from malt_jax.config import ModelConfig

ROOT = Path(__file__).parents[1]


def _example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Library use\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_example_uses_exported_names_only():
    tree = ast.parse(_example())
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "malt_jax"
    }
    assert {"run", "sample_trees", "assign_credit", "train_role", "System", "SFTExample"} <= used
    assert used <= set(malt_jax.__all__), sorted(used - set(malt_jax.__all__))
    assert all(hasattr(malt_jax, name) for name in malt_jax.__all__)


def test_example_runs(tmp_path, monkeypatch):
    code = _example()
    assert code.startswith("import malt_jax\n")
    # the example sees malt_jax's exported names and nothing else; a tiny random model stands in
    # for SmolLM2, and the whole-run calls (tested in test_pipeline.py / test_study.py) are skipped
    api = types.SimpleNamespace(**{name: getattr(malt_jax, name) for name in malt_jax.__all__})
    small = ["lora.top_layers=1", "train.sft_epochs=1", "train.dpo_epochs=1", "sampling.role_max_new_tokens=[8,8,6]"]
    api.load_run_config = lambda path, overrides=(): malt_jax.load_run_config(ROOT / path, [*overrides, *small])
    api.load_model = lambda weights: malt_jax.load_model("random", ModelConfig.tiny())
    api.run = api.run_study = lambda cfg: {}
    monkeypatch.chdir(tmp_path)
    ns = {"malt_jax": api}
    exec(compile(code.removeprefix("import malt_jax\n"), "README.md", "exec"), ns)  # noqa: S102
    assert ns["trees"][0]["R_tokens"].shape == (4, 3, 3, 3, 6)
    assert ns["tree"]["rewards"].shape == (4, 3, 3, 3) and ns["pairs"].shape[1:] == (2, 3)
    assert set(ns["adapters"]) == {"G", "V", "R"}
    assert ns["ev"]["results"]["malt+MV@3"].n == 20 and (tmp_path / "my_run" / "eval" / "malt.jsonl").exists()
