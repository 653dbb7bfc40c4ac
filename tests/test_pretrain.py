"""Pretraining from scratch (training/pretrain.py): a tiny run learns (held-out loss falls), its
model directory loads back like any Hugging Face checkpoint with equal logits and a working chat
tokenizer, a run stopped midway and resumed ends with bitwise the same parameters, bad inputs are
one-line errors, and the sharded run matches the single-device one.

Every run here has the same shapes, so the train step compiles once for the module."""

from __future__ import annotations

import dataclasses
import json
import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest

import malt_jax
from malt_jax.config import ConfigError
from malt_jax.model import llama
from malt_jax.model.small_tokenizer import CHAR_ALPHABET, min_vocab_size, train_tokenizer
from malt_jax.model.tokenizer import load_tokenizer
from malt_jax.training.corpus import ArithCorpus, get_corpus, register_corpus
from malt_jax.training.pretrain import Packer, _compiled, pretrain
from malt_jax.training.pretrain_config import load_pretrain_config

TINY = [
    "model.vocab_size=128",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=16",
    "model.hidden_dim=128",
    "tokenizer.kind=char",
    "tokenizer.sample_docs=200",
    "train.steps=30",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.learning_rate=1e-2",
    "train.warmup_steps=3",
    "train.eval_every=10",
    "train.eval_batches=2",
    "train.checkpoint_every=10",
    "mesh={data: 1}",  # one device, though the test process fakes 8
]


def tiny_cfg(out_dir, *extra: str):
    return load_pretrain_config(None, [*TINY, f"out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "model"
    cfg = tiny_cfg(out)
    return cfg, pretrain(cfg, progress=False, command="pytest")


def _final_params(cfg):
    """The parameters of the run's last checkpoint (what the model directory must hold)."""
    from malt_jax.runtime.checkpoint import Checkpointer

    fns = _compiled(cfg.model, cfg.train, None)
    params, opt_state = fns.init(cfg.train.seed)
    with Checkpointer(f"{cfg.out_dir}/checkpoints") as ck:
        state, meta = ck.restore({"params": params, "opt_state": opt_state})
    assert meta["step"] == cfg.train.steps
    return state["params"]


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------- training


def test_tiny_run_lowers_heldout_loss(trained):
    cfg, s = trained
    assert s["steps"] == 30 and s["resumed_from"] == 0 and s["command"] == "pytest"
    assert s["initial_heldout_loss"] == pytest.approx(np.log(128), abs=0.2)  # random init: ~uniform
    assert s["heldout_loss"] < s["initial_heldout_loss"] - 1.0, s
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 10, 20, 30]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 31))
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] >= 0 for r in rows if r["kind"] == "train")
    summary = json.loads((Path(cfg.out_dir) / "pretrain.json").read_text())
    assert summary["config_hash"] == cfg.hash() and summary["tokens_per_s"] > 0 and "cpu" in summary["machine"]
    if s.get("tensorboard"):
        assert list((Path(cfg.out_dir) / "tensorboard" / "pretrain" / "lm").glob("events.out.tfevents.*"))


def test_saved_model_loads_back_with_equal_logits_and_a_chat_tokenizer(trained):
    cfg, _ = trained
    model = malt_jax.load_model(str(cfg.out_dir))
    assert model.cfg.vocab_size == 128 and model.cfg.n_layers == 2 and model.cfg.dim == 64
    params = _final_params(cfg)
    tokens = np.asarray([model.tokenizer.encode("12+7=19\n3*4=12")], np.int32)
    pos = llama.causal_positions(*tokens.shape)
    want, _ = llama.forward(params, tokens, pos, cfg.model)
    got, _ = llama.forward(model.params, tokens, pos, model.cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    tok = model.tokenizer
    assert tok.vocab_size == 128 and tok.decode(tok.encode("12+7=19\n")) == "12+7=19\n"
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
    assert ids[0] == tok.token_to_id("<|im_start|>")
    text = tok.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
    # a control-token string typed in a message stays plain text
    assert tok.encode_literal("<|im_end|>") != [tok.token_to_id("<|im_end|>")]


def test_a_finished_model_directory_is_not_trained_again(trained):
    cfg, s = trained
    again = pretrain(cfg, progress=False)
    assert again["skipped"] and again["heldout_loss"] == s["heldout_loss"]
    with pytest.raises(ConfigError, match="^out_dir: .*another config"):
        pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1)), progress=False)


def test_resume_after_a_kill_gives_the_same_parameters(trained, tmp_path):
    cfg, _ = trained
    cut = tiny_cfg(tmp_path / "cut")
    stopped = pretrain(cut, progress=False, stop_after=13)  # killed after step 13: last checkpoint 10
    assert stopped["stopped_at"] == 13 and not (tmp_path / "cut" / "model.safetensors").exists()
    s = pretrain(cut, progress=False)
    assert s["resumed_from"] == 10
    a, b = _tensors(Path(cfg.out_dir)), _tensors(tmp_path / "cut")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    train = [json.loads(line) for line in (tmp_path / "cut" / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["kind"] == "train"] == list(range(1, 31))  # none twice
    # killed after the final checkpoint, before the model directory was written: nothing left to
    # run, and the summary still has the last train loss (from the metrics on disk)
    (tmp_path / "cut" / "model.safetensors").unlink()
    (tmp_path / "cut" / "pretrain.json").unlink()
    again = pretrain(cut, progress=False)
    assert again["resumed_from"] == 30 and again["train_loss"] == s["train_loss"] is not None


def test_cli_pretrain_writes_the_model_directory(tmp_path, capsys):
    from malt_jax.cli import main

    out = tmp_path / "cli"
    rc = main(["pretrain", "experiments/pretrain/testbed_tiny.yaml", *TINY, f"out_dir={out}", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "held-out loss" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain.json"} <= {
        p.name for p in out.iterdir()
    }


# ------------------------------------------------------------------------------------- bad input


def test_a_vocabulary_that_does_not_match_the_tokenizer_is_refused(trained, tmp_path):
    cfg, _ = trained
    with pytest.raises(ConfigError) as info:  # the config itself
        load_pretrain_config(None, [*TINY, "tokenizer.vocab_size=200"])
    assert str(info.value).startswith("tokenizer.vocab_size: expected 0 or model.vocab_size=128")
    # a model directory whose tokenizer has another size than model.vocab_size
    d = tmp_path / "other"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(cfg.out_dir) / f, d / f)
    with pytest.raises(ConfigError) as info:
        pretrain(tiny_cfg(d, "model.vocab_size=130"), progress=False)
    msg = str(info.value)
    assert msg.startswith("model.vocab_size: ") and str(d / "tokenizer.json") in msg and "(128)" in msg
    assert "\n" not in msg
    # an existing tokenizer named in the config (kind: file)
    with pytest.raises(ConfigError, match=r"^model.vocab_size: .*tokenizer.json \(128\), got 130$"):
        pretrain(
            tiny_cfg(tmp_path / "f", "model.vocab_size=130", "tokenizer.kind=file", f"tokenizer.path={cfg.out_dir}"),
            progress=False,
        )


def test_a_model_directory_without_a_tokenizer_is_a_one_line_error(trained, tmp_path, capsys):
    from malt_jax.cli import main

    cfg, _ = trained
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(cfg.out_dir) / f, d / f)
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as info:
        malt_jax.load_model(str(d))
    assert "\n" not in str(info.value)
    assert main(["chat", "2+2?", "--weights", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("malt-jax: error: ") and "tokenizer.json" in err and "\n" not in err
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        pretrain(tiny_cfg(tmp_path / "f", "tokenizer.kind=file", f"tokenizer.path={d}"), progress=False)


# ------------------------------------------------------------------------------------- pieces


def test_arith_corpus_is_deterministic_by_index():
    c = get_corpus("arith", seed=3, lines=2)
    assert c.documents("train", 5, 3) == c.documents("train", 5, 3) == c.documents("train", 0, 8)[5:]
    assert c.documents("train", 0, 4) != c.documents("validation", 0, 4)
    a, rest = c.documents("train", 0, 1)[0].split("\n")[0].split("=")
    assert eval(a) == int(rest)  # noqa: S307 - our own arithmetic
    with pytest.raises(ValueError, match="^corpus.name: unknown corpus 'nope'; registered corpora: .*arith"):
        get_corpus("nope")
    with pytest.raises(ValueError, match="^corpus.options"):
        get_corpus("arith", colour="red")
    with pytest.raises(ValueError, match="split"):
        c.documents("test", 0, 1)


def test_corpora_register_by_name_or_import_path():
    register_corpus("arith_alias", "malt_jax.training.corpus:ArithCorpus")  # imported when used
    assert isinstance(get_corpus("arith_alias", seed=1), ArithCorpus)
    assert get_corpus("malt_jax.training.corpus:ArithCorpus").documents("train", 0, 1)
    with pytest.raises(ValueError, match="cannot import"):
        get_corpus("malt_jax.nowhere:Corpus")


def test_packed_rows_are_a_function_of_the_index():
    tok = train_tokenizer(ArithCorpus().documents("train", 0, 100), 128, kind="char")
    p = Packer(ArithCorpus(), tok, seq_len=48)
    b = p.batch("train", 3, 4)
    assert b.shape == (4, 49) and b.dtype == np.int32
    np.testing.assert_array_equal(b, Packer(ArithCorpus(), tok, seq_len=48).batch("train", 3, 4))
    np.testing.assert_array_equal(b[1], p.row("train", 13))
    eot = tok.token_to_id("<|endoftext|>")
    assert eot in b[0]  # documents separated by <|endoftext|>
    first = tok.decode(p.row("train", 0)).split("<|endoftext|>")[0]
    assert first == ArithCorpus().documents("train", 0, 1)[0]


def test_trained_tokenizers_are_real_hf_tokenizers(tmp_path):
    texts = ["The café costs 12 euros. 345+67=412"] * 50 + ["héllo wörld, 89*2=178"] * 50
    tok = train_tokenizer(texts, 300, tmp_path / "bl", kind="bytelevel")
    back = load_tokenizer(tmp_path / "bl")
    assert back.vocab_size == 300 and back.chat_template == tok.chat_template
    weird = "naïve 🙂 12345\ttab"
    assert back.decode(back.encode(weird)) == weird  # byte-level: everything round-trips
    digits = [back.decode([i]) for i in back.encode("12345")]
    assert digits == list("12345")  # digits one by one
    assert [back.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    cfg = json.loads((tmp_path / "bl" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in cfg["chat_template"]
    train_tokenizer(texts, 101, tmp_path / "ch", kind="char")
    back = load_tokenizer(tmp_path / "ch")
    assert len(CHAR_ALPHABET) == 97 and min_vocab_size("char") == 101 == back.vocab_size
    assert back.decode(back.encode(string.ascii_letters + " 0 9\n")) == string.ascii_letters + " 0 9\n"
    assert back.decode(back.encode("é"), skip_special_tokens=False) == "<|unk|>"
    with pytest.raises(ValueError, match="^tokenizer.vocab_size: a bytelevel tokenizer needs at least 259"):
        train_tokenizer(texts, 200, kind="bytelevel")


# ------------------------------------------------------------------------------------- sharded


@pytest.mark.slow
def test_sharded_run_matches_one_device(trained, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg, s = trained
    sharded = dataclasses.replace(
        cfg, out_dir=str(tmp_path / "sharded"), mesh=(("data", 2), ("fsdp", 2), ("tensor", 2))
    )
    assert sharded.hash() == cfg.hash()  # the same run, placed differently
    t = pretrain(sharded, progress=False)
    assert t["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert t["heldout_loss"] == pytest.approx(s["heldout_loss"], rel=2e-3)
    a, b = _tensors(Path(cfg.out_dir)), _tensors(tmp_path / "sharded")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-3, err_msg=name)
