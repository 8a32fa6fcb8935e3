"""`saeens cache` survives being killed: SIGKILL at random moments, re-run with the same
arguments, and the cache ends equal to an uninterrupted one (same rows, token ids, shards, layout
files); a complete cache is left alone, other arguments on the same --out are a one-line error."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saeens.data import ActivationCache, byte_tokenizer, load_corpus
from saeens.data.cache import CacheWriter
from saeens.data.build import cache_documents
from saeens.errors import SaeensError
from test_extract import fake_acts_fn  # the position-stamping embedding lookup those tests use


class Killed(Exception):
    pass


def dies_after(n_calls):
    calls = []

    def fn(tokens_BT):
        calls.append(1)
        if len(calls) > n_calls:
            raise Killed
        return fake_acts_fn(tokens_BT)

    return fn


def assert_same_cache(a: Path, b: Path, atol: float = 0.0) -> None:
    """Equal caches: meta.json, file names, layout files, every row's activations and token id."""
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert ma == mb and ma["complete"]
    names = lambda p: sorted(f.name for f in p.iterdir())  # noqa: E731
    assert names(a) == names(b) and not any(n.endswith(".tmp") for n in names(a))
    ca, cb = ActivationCache(a), ActivationCache(b)
    for split in ("train", "test"):
        assert ca.n_rows(split) == cb.n_rows(split)
        np.testing.assert_array_equal(ca.tokens(split), cb.tokens(split))
        for xa, xb in zip(ca.chunks(split, 50_000), cb.chunks(split, 50_000), strict=True):
            np.testing.assert_allclose(xa, xb, rtol=0, atol=atol)
        if split in ma.get("splits", {}):
            f = ma["splits"][split]["contexts_file"]
            np.testing.assert_array_equal(np.load(a / f), np.load(b / f))
            f = ma["splits"][split].get("documents_file")
            assert f is None or (a / f).read_text() == (b / f).read_text()


# ----------------------------------------------------------------------------- in process, every kill point


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return load_corpus("bbc-news")[:120]


def test_resume_after_a_crash_at_every_batch_equals_an_uninterrupted_run(tok, docs, tmp_path):
    # T = 16 -> 15 rows per context; shard_rows = 100 cuts contexts in the middle: the resumed run
    # recomputes the cut context and adds only its missing rows
    kw = dict(context_length=16, batch_size=4, test_fraction=0.2, seed=1, shard_rows=100, progress=False)
    ref = cache_documents(fake_acts_fn, tok, docs, 700, tmp_path / "ref", **kw)
    # batches 1-12 are train (60 rows each, a shard of 100 every 1-2 batches), 13-15 test
    for kill_at in (1, 2, 4, 7, 12, 13, 15):
        out = tmp_path / f"k{kill_at}"
        with pytest.raises(Killed):
            cache_documents(dies_after(kill_at), tok, docs, 700, out, **kw)
        assert not json.loads((out / "meta.json").read_text())["complete"]
        (out / "acts_00099.npy").write_bytes(b"half a shard")  # not listed in meta.json: dropped
        (out / "tokens_00042.npy.tmp").write_bytes(b"x")
        cache_documents(fake_acts_fn, tok, docs, 700, out, **kw)
        assert_same_cache(ref, out)


def test_a_crash_while_resuming_and_a_second_resume(tok, docs, tmp_path):
    kw = dict(context_length=16, batch_size=4, test_fraction=0.2, seed=1, shard_rows=100, progress=False)
    ref = cache_documents(fake_acts_fn, tok, docs, 700, tmp_path / "ref", **kw)
    out = tmp_path / "k"
    for n in (3, 4, 5):  # every run dies a few batches after the last one's shards
        with pytest.raises(Killed):
            cache_documents(dies_after(n), tok, docs, 700, out, **kw)
    cache_documents(fake_acts_fn, tok, docs, 700, out, **kw)
    assert_same_cache(ref, out)


def test_complete_cache_is_left_alone_and_other_arguments_fail_in_one_line(tok, docs, tmp_path, capsys):
    kw = dict(context_length=16, batch_size=4, seed=1, shard_rows=100)
    out = cache_documents(fake_acts_fn, tok, docs, 300, tmp_path / "c", progress=False, **kw)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}

    def never(t):
        raise AssertionError("a complete cache must not run the model")

    assert cache_documents(never, tok, docs, 300, out, **kw) == out
    assert "already complete" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp
    for change, what in (({"n_tokens": 400}, "n_tokens"), ({"seed": 2}, "seed"), ({"docs": docs[:100]}, "documents"),
                         ({"context_length": 32}, "context_length")):
        args = {**kw, "context_length": change.get("context_length", 16), "seed": change.get("seed", 1)}
        with pytest.raises(SaeensError, match=f"built with {what}.*same arguments.*new --out") as e:
            cache_documents(never, tok, change.get("docs", docs), change.get("n_tokens", 300), out, **args)
        assert "\n" not in str(e.value)
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp
    # an interrupted cache with other arguments is refused too, and kept
    with pytest.raises(Killed):
        cache_documents(dies_after(3), tok, docs, 300, tmp_path / "i", **kw)
    with pytest.raises(SaeensError, match="n_tokens"):
        cache_documents(fake_acts_fn, tok, docs, 301, tmp_path / "i", **kw)
    # a directory of other files is still not overwritten
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "notes.txt").write_text("keep me")
    with pytest.raises(SaeensError, match="not empty"):
        cache_documents(fake_acts_fn, tok, docs, 300, tmp_path / "u", **kw)


def test_writer_resume_drops_strays_and_appends(tmp_path):
    w = CacheWriter(tmp_path / "w", 3, {"model": "m"}, shard_rows=4)
    w.add(np.ones((6, 3)), np.arange(6))  # one shard of 4, 2 rows pending (lost by the "crash")
    (tmp_path / "w" / "acts_00001.npy.tmp").write_bytes(b"x")
    w = CacheWriter(tmp_path / "w", 3, {"model": "m"}, shard_rows=4, resume=True)
    assert w.rows("train") == 4 and not list((tmp_path / "w").glob("*.tmp"))
    w.add(np.full((5, 3), 2.0), np.arange(4, 9))
    w.close()
    c = ActivationCache(tmp_path / "w")
    assert [s["rows"] for s in c.shards("train")] == [4, 4, 1]
    np.testing.assert_array_equal(c.tokens("train"), [0, 1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(SaeensError, match="complete"):
        CacheWriter(tmp_path / "w", 3, shard_rows=4, resume=True)


# ----------------------------------------------------------------------------- the real command, SIGKILL


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama as a transformers save_pretrained directory (config, safetensors,
    byte tokenizer), written with numpy: a subprocess can load it by path."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    cfg.save_pretrained(d)
    rng = np.random.default_rng(0)
    w = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(257, 16), "model.norm.weight": 1 + w(16), "lm_head.weight": w(257, 16)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(16, 16), p + "self_attn.k_proj.weight": w(8, 16),
              p + "self_attn.v_proj.weight": w(8, 16), p + "self_attn.o_proj.weight": w(16, 16),
              p + "mlp.gate_proj.weight": w(32, 16), p + "mlp.up_proj.weight": w(32, 16),
              p + "mlp.down_proj.weight": w(16, 32), p + "input_layernorm.weight": 1 + w(16),
              p + "post_attention_layernorm.weight": 1 + w(16)}
    save_file(t, str(d / "model.safetensors"))
    byte_tokenizer().save_pretrained(d)
    return d


def _cmd(model_dir: Path, out: Path) -> list[str]:
    # 200k train rows = 3 full shards of 65536 (cutting contexts: 65536 % 15 = 1) + a short one, then the test split
    return [sys.executable, "-m", "saeens", "cache", "--model", str(model_dir), "--layer", "1", "--dataset",
            "bbc-news", "--tokens", "200000", "--out", str(out), "--context-length", "16", "--batch-size", "64"]


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _shards(out: Path) -> int:
    try:
        return len(json.loads((out / "meta.json").read_text())["shards"])
    except (OSError, ValueError):
        return 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_cache(tiny_model_dir, tmp_path, capsys):
    from saeens.cli import main

    seed = int(os.environ.get("SAEENS_FAULT_SEED", time.time_ns() % 10_000))
    rnd = random.Random(seed)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.Popen(_cmd(tiny_model_dir, ref_out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kills = []
    for i in (1, 2):  # run i is SIGKILLed at a random moment after it wrote a new shard, and shard i exists
        before = _shards(out)
        p = subprocess.Popen(_cmd(tiny_model_dir, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600  # generous: startup is slow on a loaded machine
        while (_shards(out) <= before or _shards(out) < i) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0, 0.3))  # ~10k rows: the run still has a shard or more to go
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills.append(_shards(out))
    assert kills, f"seed {seed}: the runs ended before they could be killed"
    done = subprocess.run(_cmd(tiny_model_dir, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-2000:]
    # the same activations (1e-6: resumed batches group other contexts) and exactly the same tokens
    assert_same_cache(ref_out, out, atol=1e-6)
    assert ActivationCache(out).n_rows("train") == 200_000, f"seed {seed}, killed after shards {kills}"
    # the same command once more: complete, nothing to do (decided before the model is loaded)
    stamp = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert main(_cmd(tiny_model_dir, out)[3:]) == 0
    assert "already complete" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == stamp
