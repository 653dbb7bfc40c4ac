"""Subprocess driver for tests/test_reliability.py: runs the whole MALT pipeline on a tiny
random model with ``ParityTask`` (mixed rewards), so the test can SIGKILL it at any point.

    python tests/reliability_driver.py CONFIG.yaml

Exit code 0 when the run completed; the run dir gets ``done.json`` (the summary's table).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make ``malt_jax`` importable from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from malt_jax.tasks import Example, LoadResult, Task, default_prompts  # noqa: E402


class ParityTask(Task):
    """Answer = parity of the output's length, so a random model gets about half right and
    every tree has positive and negative leaves (as in tests/test_pipeline.py)."""

    name = "parity"

    def __init__(self):
        super().__init__()
        self.prompts = default_prompts("synthetic")

    def _load(self, split):
        return LoadResult([Example(id=f"{split}-{i}", question=f"Question number {i}?", answer="even")
                           for i in range(12)])

    def extract(self, text):
        return "even" if len(text) % 2 == 0 else "odd"

    def grade(self, text, gold):
        return int(self.extract(text) == gold)


def main(config: str) -> int:
    import logging

    from malt_jax import pipeline
    from malt_jax.config import load_run_config

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("malt_jax").setLevel(logging.INFO)  # "resuming ..." lines for the test
    cfg = load_run_config(config)
    summary = pipeline.run(cfg, task=ParityTask(), progress=False)
    (Path(cfg.run_dir) / "done.json").write_text(json.dumps({"table": summary["table"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
