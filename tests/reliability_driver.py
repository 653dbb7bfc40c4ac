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

from tests.parity_task import ParityTask  # noqa: E402


def main(config: str) -> int:
    import logging

    from malt_jax.config import load_run_config
    from malt_jax.workflows import pipeline

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("malt_jax").setLevel(logging.INFO)  # "resuming ..." lines for the test
    cfg = load_run_config(config)
    summary = pipeline.run(cfg, task=ParityTask(), progress=False)
    (Path(cfg.run_dir) / "done.json").write_text(json.dumps({"table": summary["table"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
