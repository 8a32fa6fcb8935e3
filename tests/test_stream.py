"""Training straight from the model (saeens/data/stream.py): the stream's batches are the cache's
rows in the documented order, training on either gives the same parameters, a process computes
only its rows' contexts, a SIGKILLed run resumes to the uninterrupted one, and the command line
trains, evaluates and refuses like the cache path."""

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from saeens.data import ActivationCache, byte_tokenizer, load_corpus
from saeens.data.build import cache_documents
from saeens.data.extract import model_acts_fn
from saeens.data.stream import ModelStream, model_stream, open_stream
from saeens.errors import SaeensError

HOOK = "blocks.1.hook_resid_post"
T, R = 16, 15  # context length, rows per context (BOS dropped)
W = 8  # contexts per shuffle window
N_DOCS = 6


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def docs():
    return load_corpus("bbc-news")[:N_DOCS]


def _stream(model, tok, docs, **kw) -> ModelStream:
    return open_stream(model_acts_fn(model, HOOK), tok, docs, context_length=T, buffer_contexts=W, model_batch=8,
                       info={"model": "tiny", "hook": HOOK}, **kw)


@pytest.fixture(scope="module")
def cache(tiny_model, tok, docs, tmp_path_factory):
    """Every full context of both splits, as `saeens cache` writes them (same model calls of 8)."""
    out = tmp_path_factory.mktemp("stream") / "acts"
    return ActivationCache(cache_documents(model_acts_fn(tiny_model, HOOK), tok, docs, None, out, context_length=T,
                                           batch_size=8, progress=False, meta={"model": "tiny", "hook": HOOK}))


def expected_rows(n_contexts: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The cache rows of stream batch `step`, from the layout as documented, one row at a time."""
    keyed = []
    for p in range(step * batch_size, (step + 1) * batch_size):
        epoch, q = divmod(p, n_contexts * R)
        w, o = divmod(q, W * R)
        members = np.random.default_rng([seed, epoch]).permutation(n_contexts)[w * W : (w + 1) * W]
        j, t = divmod(int(np.random.default_rng([seed, epoch, w]).permutation(len(members) * R)[o]), R)
        keyed.append(((Fraction(j, len(members)), epoch, w, j, t), int(members[j]) * R + t))
    return np.array([row for _, row in sorted(keyed)])


def test_batches_are_the_cache_rows_in_the_documented_order(tiny_model, tok, docs, cache):
    s = _stream(tiny_model, tok, docs)
    assert s.n_contexts * R == cache.n_rows("train") and s.d_in == cache.d_in
    n_rows = cache.n_rows("train")
    steps_per_epoch = n_rows // 64
    for step in (0, 1, 5, steps_per_epoch, steps_per_epoch + 1):  # straddles windows and the epoch's end
        np.testing.assert_array_equal(s.batch(step, 64, 3), cache.gather(expected_rows(s.n_contexts, 3, step, 64)))
        assert len(s.buffer) <= 2 * W  # at most the windows of one batch
    desc = s.describe()
    assert desc["kind"] == "stream" and desc["train_rows"] == n_rows and desc["context_length"] == T
    assert (desc["model"], desc["hook"], desc["dataset"], desc["split_seed"]) == ("tiny", HOOK, "documents", 0)


def test_a_process_computes_only_its_rows_and_the_batch_never_depends_on_the_processes(tiny_model, tok, docs):
    B, seed, steps = 96, 1, range(10)  # 8 windows of 8 contexts x 15 rows
    whole = _stream(tiny_model, tok, docs)
    whole.runner.contexts_run = 0
    ref = [whole.batch(step, B, seed) for step in steps]
    single = whole.runner.contexts_run
    assert single == 8 * W  # each context of a window runs through the model once
    for P in (2, 4):
        procs = [_stream(tiny_model, tok, docs) for _ in range(P)]
        for p in procs:
            p.runner.contexts_run = 0
        for step, want in zip(steps, ref):
            got = [s.batch(step, B, seed, slice(i * B // P, (i + 1) * B // P)) for i, s in enumerate(procs)]
            np.testing.assert_array_equal(np.concatenate(got), want)
        for s in procs:  # its share of each window, and a context or two at each edge of its slice
            assert s.runner.contexts_run <= single // P + 2 * 8, (P, [q.runner.contexts_run for q in procs])


def test_init_sample_is_seeded_rows_of_the_stream(tiny_model, tok, docs, cache):
    s = _stream(tiny_model, tok, docs)
    a, b = s.init_sample(100, 5), _stream(tiny_model, tok, docs).init_sample(100, 5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (100, 8) and not np.array_equal(a, s.init_sample(100, 6))
    rows = cache.gather(np.arange(cache.n_rows("train")))
    assert all(np.any(np.all(rows == x, axis=1)) for x in a[:10])


class CacheInStreamOrder:
    """A BatchSource over the cache that serves the stream's batches by the documented layout (and
    its init sample: n seeded rows of the first 2n/(T-1) contexts of epoch 0)."""

    def __init__(self, cache, n_contexts):
        self.cache, self.n_contexts, self.d_in = cache, n_contexts, cache.d_in

    def describe(self):
        return {"path": str(self.cache.path), "d_in": self.d_in, "train_rows": self.cache.n_rows("train")}

    def init_sample(self, n, seed):
        ctx = np.sort(np.random.default_rng([seed, 0]).permutation(self.n_contexts)[: -(-2 * n // R)])
        rows = (ctx[:, None] * R + np.arange(R)).reshape(-1)
        pick = np.random.default_rng([seed, 1 << 30]).choice(len(rows), size=min(n, len(rows)), replace=False)
        return self.cache.gather(rows[np.sort(pick)])

    def batch(self, step, batch_size, seed, rows=slice(None)):
        return self.cache.gather(expected_rows(self.n_contexts, seed, step, batch_size)[rows])


def _run(method, members=2, steps=6, batch=64, checkpoint_every=0):
    from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig

    return RunConfig(SAEConfig(d_in=8, width=16, arch="topk", k=3),
                     TrainConfig(n_tokens=batch * steps, batch_size=batch, lr=3e-3, geometric_median_samples=200,
                                 checkpoint_every=checkpoint_every, log_every=2),
                     EnsembleConfig(method, members))


@pytest.mark.parametrize("method", ["bagging", "boosting"])
def test_training_from_the_stream_equals_training_from_the_cache(tiny_model, tok, docs, cache, tmp_path, method):
    from saeens.train import fit

    s = _stream(tiny_model, tok, docs)
    a = fit(tmp_path / "stream", _run(method), s, progress=False)
    b = fit(tmp_path / "cache", _run(method), CacheInStreamOrder(cache, s.n_contexts), progress=False)
    for k in a.params:
        np.testing.assert_array_equal(np.asarray(a.params[k]), np.asarray(b.params[k]), err_msg=k)
    recorded = json.loads((tmp_path / "stream" / "activations.json").read_text())
    assert recorded["kind"] == "stream" and recorded["hook"] == HOOK and recorded["buffer_contexts"] == W


def test_training_on_a_mesh_asks_each_device_block_for_its_rows_only(tiny_model, tok, docs, tmp_path):
    """8 devices, data axis 4: the loop asks the stream for row blocks, never the whole batch, and
    the parameters are those of the run without a mesh (to the sharded sums' rounding)."""
    from saeens.sharding import make_mesh
    from saeens.train import fit

    class Asked(ModelStream):
        def batch(self, step, batch_size, seed, rows=slice(None)):
            self.asked.append(len(range(batch_size)[rows]))
            return super().batch(step, batch_size, seed, rows)

    s = _stream(tiny_model, tok, docs)
    s.__class__, s.asked = Asked, []
    a = fit(tmp_path / "mesh", _run("bagging"), s, progress=False, mesh=make_mesh(2, 4))
    assert s.asked and set(s.asked) == {64 // 4}
    b = fit(tmp_path / "plain", _run("bagging"), _stream(tiny_model, tok, docs), progress=False)
    for k in a.params:
        np.testing.assert_allclose(np.asarray(a.params[k]), np.asarray(b.params[k]), rtol=2e-4, atol=2e-5, err_msg=k)


class Counted(ModelStream):
    """The stream, counting the contexts its batches (not its init sample) ran and the rows asked."""

    def batch(self, step, batch_size, seed, rows=slice(None)):
        before = self.runner.contexts_run
        out = super().batch(step, batch_size, seed, rows)
        self.batch_contexts = getattr(self, "batch_contexts", 0) + self.runner.contexts_run - before
        self.rows_asked = getattr(self, "rows_asked", 0) + len(out)
        return out


def test_two_processes_each_run_the_model_for_their_half_of_every_batch(tiny_model, tok, docs, tmp_path):
    """Two processes (4 CPU devices each, data axis 8): each asks for and computes only its rows,
    the run equals one process without a mesh, and each ran well under all the contexts."""
    import socket

    from saeens.train import fit

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), str(port), str(tmp_path)], env=env,
                              cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=400)[0].decode()[-3000:] for p in procs]
    finally:  # never leave a worker behind (a dead peer blocks the other one)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), logs
    single = _stream(tiny_model, tok, docs)
    single.__class__ = Counted
    ref = fit(tmp_path / "single", _run("bagging", steps=12, batch=96), single, progress=False)
    for i in range(2):
        info = json.loads((tmp_path / f"info{i}.json").read_text())
        assert info["rows_asked"] == 12 * 96 // 2
        assert info["batch_contexts"] <= 0.75 * single.batch_contexts, (info, single.batch_contexts)
        got = np.load(tmp_path / f"params{i}.npz")
        for k, v in ref.params.items():
            np.testing.assert_allclose(got[k], np.asarray(v), rtol=2e-4, atol=2e-5, err_msg=f"process {i} {k}")


def _multihost_worker(process_id: int, port: int, out: Path) -> None:
    from saeens import sharding

    sharding.initialize_distributed(f"localhost:{port}", 2, process_id, timeout_s=120)
    import conftest
    import jax

    from saeens.train import fit

    s = _stream(conftest.tiny_model.__wrapped__(), byte_tokenizer(), load_corpus("bbc-news")[:N_DOCS])
    s.__class__ = Counted
    ens = fit(out / "shared_run", _run("bagging", steps=12, batch=96), s, progress=False, mesh=sharding.make_mesh(1, 8))
    np.savez(out / f"params{process_id}.npz", **{k: np.asarray(v) for k, v in ens.params.items()})
    (out / f"info{process_id}.json").write_text(json.dumps({"rows_asked": s.rows_asked, "batch_contexts": s.batch_contexts}))
    jax.distributed.shutdown()


@pytest.fixture
def tiny_world(tiny_model, tok, docs, monkeypatch):
    """`--model tiny`, `--dataset tinynews` and `--dataset empty` for the command line (everything
    else is real: another dataset name is looked up on the (offline) hub)."""
    from saeens import models
    from saeens.data import build, corpora

    real = corpora.load_corpus
    monkeypatch.setattr(models, "load_model", lambda name: (tiny_model, tok) if name == "tiny" else models.registry.load_model(name))
    for module in (corpora, build):  # build: the spliced loss's held-out contexts
        monkeypatch.setattr(module, "load_corpus", lambda name, **kw: {"tinynews": list(docs), "empty": []}.get(name)
                            if name in ("tinynews", "empty") else real(name, **kw))


TRAIN = ["--dataset", "tinynews", "--context-length", str(T), "--buffer-contexts", str(W), "--model-batch", "8",
         "--method", "bagging", "--members", "2", "--arch", "topk", "--width", "16", "--k", "3", "--tokens", "640",
         "--batch-size", "64", "--quiet"]


def test_cli_trains_and_evaluates_from_the_model_like_from_its_cache(tiny_world, tiny_model, tok, docs, cache, tmp_path,
                                                                     capsys):
    from saeens.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--layer", "1", "--out", str(run), *TRAIN]) == 0
    src = json.loads((run / "activations.json").read_text())
    assert (src["kind"], src["model"], src["hook"], src["dataset"], src["split_seed"], src["context_length"]) == (
        "stream", "tiny", HOOK, "tinynews", 0, T)
    assert json.loads((run / "ensemble.json").read_text())["hook"] == HOOK
    capsys.readouterr()
    for other in (["--split-seed", "1"], ["--context-length", "32"], ["--buffer-contexts", "4"], ["--layer", "0"]):
        argv = ["train", "--model", "tiny", "--layer", "1", "--out", str(run), *TRAIN, *other]
        assert main(argv) == 2, other
        err = capsys.readouterr().err.strip()
        assert err.startswith("saeens: error: ") and "was trained on the stream of tiny" in err and "\n" not in err
    assert main(["train", "--activations", str(cache.path), "--out", str(run), *TRAIN[8:]]) == 2
    assert "not on the cache" in capsys.readouterr().err
    # held-out documents streamed through the model == the test rows of a cache of the same split
    streamed, cached = tmp_path / "s.json", tmp_path / "c.json"
    assert main(["evaluate", str(run), "--model", "tiny", "--json", str(streamed), "--quiet"]) == 0
    assert main(["evaluate", str(run), "--activations", str(cache.path), "--json", str(cached), "--quiet"]) == 0
    a, b = json.loads(streamed.read_text()), json.loads(cached.read_text())
    assert a["n_tokens"] == b["n_tokens"] == cache.n_rows("test")
    for k in ("mse", "explained_variance", "l0", "dead_fraction", "connectivity"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert {"ce_loss_clean", "ce_loss_spliced", "delta_lm_loss"} <= set(a)  # --model also measures the spliced loss
    capsys.readouterr()
    assert main(["evaluate", str(run), "--model", "tiny", "--split-seed", "3", "--quiet"]) == 2
    assert "drop --split-seed" in capsys.readouterr().err


def test_a_missing_model_or_dataset_a_bad_layer_and_an_empty_corpus_fail_as_the_cache_does(tiny_world, tmp_path,
                                                                                            capsys):
    from saeens.cli import main

    cases = [["--model", "no-such-model", "--layer", "1"], ["--model", "tiny", "--layer", "2"],
             ["--model", "tiny", "--layer", "1", "--dataset", "no-such-dataset"],
             ["--model", "tiny", "--layer", "1", "--dataset", "empty"],
             ["--model", "tiny", "--layer", "1", "--dataset", "tinynews", "--context-length", "100000"]]
    for case in cases:
        assert main(["cache", "--out", str(tmp_path / "acts"), *case]) == 2, case
        want = capsys.readouterr().err.strip().splitlines()[-1]  # after the cache's progress bar
        assert main(["train", "--out", str(tmp_path / "run"), *TRAIN[2:], *case]) == 2, case
        got = capsys.readouterr().err.strip()
        assert got == want and got.startswith("saeens: error: ") and "\n" not in got, (case, got, want)
    assert not (tmp_path / "run").exists()


def _checkpoint_steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _worker(out: Path, checkpoint_every: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(out), str(checkpoint_every)], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    from safetensors.numpy import load_file

    ref = tmp_path / "ref"
    _train_in_this_process(str(ref), 0)
    cut = tmp_path / "cut"
    p = _worker(cut, 1)  # a checkpoint every step: the kill often lands mid-write
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and len(_checkpoint_steps(cut)) < 3:
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert not (cut / "ensemble.json").exists()
    p = _worker(cut, 1)  # resumes with an empty buffer: the resumed step's window runs through the model again
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    want, got = load_file(str(ref / "ensemble.safetensors")), load_file(str(cut / "ensemble.safetensors"))
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _train_in_this_process(out: str, checkpoint_every: int) -> None:
    """The worker: a run of 24 steps (batches straddle windows) of the tiny model's stream."""
    import conftest

    from saeens.train import fit

    model = conftest.tiny_model.__wrapped__()
    stream = _stream(model, byte_tokenizer(), load_corpus("bbc-news")[:N_DOCS])
    fit(out, _run("bagging", steps=24, batch=48, checkpoint_every=checkpoint_every), stream, progress=False)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1] == "multihost":
        _multihost_worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        _train_in_this_process(sys.argv[1], int(sys.argv[2]))
