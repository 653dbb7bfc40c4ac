"""The malt-jax command: errors are one clear line with exit code 2; chat answers (slow)."""

import pytest

from malt_jax import cli


def test_unknown_config_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain: {learning_rate: 1e-3, lerning_rate: 2}\n")
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("malt-jax: error:") and "train.lerning_rate" in err and str(cfg) in err
    assert "\n" not in err


def test_wrong_type_override_names_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    assert cli.main(["expand", str(cfg), "tree.n=three"]) == 2
    assert "tree.n" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_prints_greedy_answer(capsys):
    assert cli.main(["chat", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    assert "Paris" in capsys.readouterr().out
