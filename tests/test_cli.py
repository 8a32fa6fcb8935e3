"""The `saeens` command end to end, and every bad input it refuses: one line, exit 2, nothing lost."""

import json

import numpy as np
import pytest

from saeens.cli import main

TRAIN = ["--arch", "topk", "--width", "16", "--k", "3", "--tokens", "2560", "--batch-size", "128", "--lr", "3e-3", "--quiet"]


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "acts"
    assert main(["synthetic", "--out", str(out), "--d-in", "16", "--features", "32", "--tokens", "4000", "--active", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def run(acts, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run"
    assert main(["train", "--activations", str(acts), "--out", str(out), "--method", "bagging", "--members", "2", *TRAIN]) == 0
    return out


def _fails(capsys, argv, *words):
    """The command exits 2 with ONE line on stderr naming the problem; no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines), lines
    err = lines[-1]  # informational lines (e.g. "resuming ...") may come first
    assert err.startswith("saeens: error:") and sum(line.startswith("saeens:") for line in lines) == 1, lines
    for w in words:
        assert w in err, err
    return err


def test_train_evaluate_export_stability(acts, run, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--activations", str(acts), "--json", str(out_json), "--quiet"]) == 0
    result = json.loads(out_json.read_text())
    for key in ["mse", "explained_variance", "explained_variance_per_token", "fvu", "l0", "relative_reconstruction_bias",
                "dead_fraction", "dense_fraction", "diversity", "connectivity"]:
        assert key in result and np.isfinite(result[key]), key
    assert result["method"] == "bagging" and result["n_features"] == 32
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "ev_drivers" not in printed  # the table; nested values stay in the JSON
    assert "pooled; lowest: dim " in printed and len(result["ev_drivers"]) == 5
    per_member = result["l0_per_member"]  # the two members split the ensemble's l0 (each TopK member fires k = 3)
    assert per_member == pytest.approx([3.0, 3.0]) and sum(per_member) == pytest.approx(result["l0"])
    assert "per member: l0 3 / 3; dead fraction " in printed
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "manifest.json").is_file()
    run2 = tmp_path / "run2"
    assert main(["train", "--activations", str(acts), "--out", str(run2), "--method", "bagging", "--members", "2", "--seed", "1", *TRAIN]) == 0
    stab = tmp_path / "stab.json"
    assert main(["stability", str(run), str(run2), "--json", str(stab)]) == 0
    s = json.loads(stab.read_text())
    assert 0 < s["stability"] <= 1 and len(s["stability_scores"]) == 2
    assert np.mean(s["stability_per_member"]) == pytest.approx(np.mean(s["stability_scores"]), rel=1e-5)
    assert f"stability per member: {s['stability_per_member'][0]:.3g} / " in capsys.readouterr().out


def test_rerunning_a_finished_run_resumes_and_keeps_it(acts, run, capsys):
    before = (run / "ensemble.safetensors").read_bytes()
    argv = ["train", "--activations", str(acts), "--out", str(run), "--method", "bagging", "--members", "2", *TRAIN]
    assert main(argv) == 0
    assert (run / "ensemble.safetensors").read_bytes() == before
    _fails(capsys, [*argv[:-1], "--seed", "5"], "different config")  # another config into the same --out


def test_missing_files(tmp_path, capsys):
    _fails(capsys, ["cache", "--from-npy", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "a")], "does not exist")
    _fails(capsys, ["train", "--activations", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), *TRAIN], "saeens cache")
    _fails(capsys, ["evaluate", str(tmp_path / "norun"), "--activations", str(tmp_path)], "no meta.json")


def test_missing_and_truncated_shard(acts, tmp_path, capsys):
    import shutil

    broken = tmp_path / "acts"
    shutil.copytree(acts, broken)
    shard = broken / "acts_00000.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(capsys, ["train", "--activations", str(broken), "--out", str(tmp_path / "r"), *TRAIN], "acts_00000.npy", "truncated")
    shard.unlink()
    _fails(capsys, ["train", "--activations", str(broken), "--out", str(tmp_path / "r"), *TRAIN], "missing")


def test_nan_and_inf_activations(tmp_path, capsys):
    arr = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    arr[17, 2] = np.nan
    np.save(tmp_path / "x.npy", arr)
    _fails(capsys, ["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a")], "row 17", "NaN")
    arr[17, 2], arr[3, 0] = 0.0, np.inf
    np.save(tmp_path / "x.npy", arr)
    _fails(capsys, ["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a")], "row 3")


def test_wrong_d_in(acts, run, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(100, 5)).astype(np.float32))
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a5")]) == 0
    _fails(capsys, ["evaluate", str(run), "--activations", str(tmp_path / "a5")], "d_in=16", "d_in=5")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sae": {"d_in": 7, "width": 8}}))
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--config", str(cfg)], "d_in=7")


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--k", "99"], ["k=99", "width"]),
        (["--members", "0", "--method", "bagging"], ["members", ">= 1"]),
        (["--lr", "0"], ["learning rate"]),
        (["--method", "single", "--members", "3"], ["--members 1"]),
    ],
)
def test_bad_hyperparameters(acts, tmp_path, capsys, flags, words):
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), *TRAIN, *flags], *words)
    assert not (tmp_path / "r").exists()


def test_config_file_with_unknown_keys(acts, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sae": {"width": 8, "widht": 9}}))
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--config", str(cfg)], "widht")
    cfg.write_text("{not json")
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--config", str(cfg)], "not valid JSON")


def test_corrupt_checkpoint_is_reported_and_kept(acts, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--activations", str(acts), "--out", str(out), "--method", "single", "--members", "1", *TRAIN, "--checkpoint-every", "5"]
    assert main(argv) == 0
    (out / "ensemble.json").unlink()  # pretend the run was cut before its end
    files = [f for f in sorted((out / "checkpoints").rglob("*")) if f.is_file() and f.stat().st_size > 0]
    for f in files:
        f.write_bytes(b"garbage")
    _fails(capsys, argv, "corrupt")
    assert all(f.read_bytes() == b"garbage" for f in files)  # nothing deleted behind the user's back


def test_output_directory_not_empty(acts, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("keep me")
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), *TRAIN], "not empty")
    _fails(capsys, ["synthetic", "--out", str(tmp_path / "r")], "not empty")
    assert (tmp_path / "r" / "notes.txt").read_text() == "keep me"


def test_disk_full_while_writing_keeps_earlier_files(tmp_path, capsys, monkeypatch):
    import errno
    import functools

    from saeens.data import cache

    arr = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    real_save, calls = np.save, []

    def full_disk(f, a, *args, **kw):
        calls.append(1)
        if len(calls) > 2:  # the first shard (tokens + acts) fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(f.name))
        return real_save(f, a, *args, **kw)

    monkeypatch.setattr(cache.np, "save", full_disk)
    out = tmp_path / "acts"
    argv = ["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(out)]
    monkeypatch.setattr(cache, "cache_from_array", functools.partial(cache.cache_from_array, shard_rows=100))
    err = _fails(capsys, argv, "No space left", "free some space")
    assert "files written before are kept" in err
    meta = json.loads((out / "meta.json").read_text())
    assert not meta["complete"] and [s["rows"] for s in meta["shards"]] == [100]
    np.testing.assert_array_equal(np.load(out / "acts_00000.npy"), arr[:100])


def test_nan_in_cache_is_named_at_train_time(acts, tmp_path, capsys):
    import shutil

    broken = tmp_path / "acts"
    shutil.copytree(acts, broken)
    shard = np.load(broken / "acts_00000.npy")
    shard[123, 5] = np.inf  # a cache edited (or corrupted) after it was written
    np.save(broken / "acts_00000.npy", shard)
    _fails(capsys, ["train", "--activations", str(broken), "--out", str(tmp_path / "r"), *TRAIN], "acts_00000.npy row 123", "NaN/Inf")
    assert not (tmp_path / "r" / "ensemble.json").exists()


def test_train_on_a_device_mesh_matches_unsharded(acts, run, tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "meshed"
    argv = ["train", "--activations", str(acts), "--out", str(out), "--method", "bagging", "--members", "2", *TRAIN]
    assert main([*argv, "--mesh", "2x4"]) == 0
    a, b = load_file(str(run / "ensemble.safetensors")), load_file(str(out / "ensemble.safetensors"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    _fails(capsys, [*argv[:4], str(tmp_path / "m2"), *argv[5:], "--mesh", "2by4"], "ENSEMBLExDATA")


def test_non_finite_loss_stops_and_keeps_no_bad_checkpoint(tmp_path, capsys):
    arr = np.full((600, 4), 1e20, np.float32) * np.random.default_rng(0).uniform(0.5, 1.5, (600, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)  # finite, but its squares overflow float32
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a")]) == 0
    out = tmp_path / "r"
    _fails(capsys, ["train", "--activations", str(tmp_path / "a"), "--out", str(out), "--arch", "relu", "--width", "8",
                    "--tokens", "1280", "--batch-size", "128", "--no-normalize", "--checkpoint-every", "1", "--quiet"],
           "loss became", "last good checkpoint")
    assert not (out / "checkpoints").exists() or not any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
    assert not (out / "ensemble.json").exists()


def test_unknown_model_name(tmp_path, capsys):
    _fails(capsys, ["cache", "--model", "gpt-17", "--layer", "1", "--out", str(tmp_path / "a")], "unknown model", "smollm2-135m")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_version_and_train_help_show_defaults_and_choices(capsys):
    import saeens
    from saeens.config import SAEConfig, TrainConfig

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"saeens {saeens.__version__}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--arch {relu,topk,batchtopk,jumprelu}" in text and "--method {single,expanded,bagging,boosting,sweep}" in text
    for flag, default in [("--batch-size", TrainConfig.batch_size), ("--lr", TrainConfig.lr), ("--k", SAEConfig.k),
                          ("--tokens", TrainConfig.n_tokens), ("--members", 1), ("--arch", "topk")]:
        entry = text[text.index(f"{flag} ", text.index("options:")):].split(" --")[0]  # up to the next flag
        assert entry.endswith(f"(default: {default})"), entry
    assert "required: here or in --config" in text  # --width has no default


def test_flag_defaults_stay_unset_so_a_config_file_applies(tmp_path):
    from saeens.cli import build_parser
    from saeens.train_flags import train_config

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sae": {"width": 8, "arch": "relu", "k": 4}, "train": {"lr": 1e-3, "batch_size": 64}}))
    argv = ["train", "--activations", "A", "--out", "R", "--config", str(cfg)]
    run = train_config(build_parser().parse_args(argv), d_in=16)
    assert (run.train.lr, run.train.batch_size, run.sae.arch, run.sae.k) == (1e-3, 64, "relu", 4)  # stored k is fine
    run = train_config(build_parser().parse_args([*argv, "--lr", "2e-3"]), d_in=16)
    assert run.train.lr == 2e-3


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--arch", "relu", "--k", "8"], ["--k applies to topk and batchtopk, not to relu", "drop --k"]),
        (["--arch", "topk", "--l1", "2"], ["--l1 applies to relu, not to topk"]),
        (["--l0", "0.5"], ["--l0 applies to jumprelu, not to topk"]),  # topk is the default arch
        (["--arch", "jumprelu", "--k", "8", "--l1", "1"], ["--k applies", "and 1 more", "--l1 applies"]),
    ],
)
def test_flags_the_architecture_does_not_use_are_refused(acts, tmp_path, capsys, flags, words):
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--width", "16", *flags], *words)
    assert not (tmp_path / "r").exists()


def test_tokens_below_one_batch_gives_the_fix_and_hides_no_other_problem(acts, tmp_path, capsys):
    argv = ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--width", "16", "--tokens", "2048"]
    _fails(capsys, argv, "--tokens 2048 is below one batch of 4096", "pass --batch-size 2048 or less")
    _fails(capsys, [*argv, "--k", "99", "--method", "bagging", "--members", "0"], "k=99", "--tokens 2048", "members J", "and 2 more")
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--arch", "relu", "--k", "8"],
           "no SAE width", "--k applies")
    assert not (tmp_path / "r").exists()


def test_architecture_is_a_choice_on_the_command_line_and_checked_in_a_config_file(acts, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--activations", str(acts), "--out", str(tmp_path / "r"), *TRAIN, "--arch", "gated"])
    assert e.value.code == 2 and "invalid choice: 'gated'" in capsys.readouterr().err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"sae": {"width": 8, "arch": "gated"}}))
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--config", str(cfg)],
           "unknown architecture 'gated'", "topk")
    assert not (tmp_path / "r").exists()


def test_export_of_a_cache_directory_says_what_to_pass(acts, tmp_path, capsys):
    err = _fails(capsys, ["export", str(acts), "--out", str(tmp_path / "e")], "is an activation cache, not a run")
    assert f"--out {acts}" not in err  # the old advice (train into the cache directory) would fail
    _fails(capsys, ["export", str(tmp_path / "none"), "--out", str(tmp_path / "e")], "holds no finished run")


def test_mesh_of_the_wrong_size_names_one_device_in_the_singular():
    import jax

    from saeens.errors import SaeensError
    from saeens.sharding import make_mesh

    with pytest.raises(SaeensError, match="needs 2 devices but 1 device is given"):
        make_mesh(2, 1, devices=jax.devices()[:1])
    with pytest.raises(SaeensError, match="but 3 devices are given"):
        make_mesh(2, 1, devices=jax.devices()[:3])


def test_npy_input_float16_is_converted_with_a_note_other_kinds_are_refused(tmp_path, capsys):
    x = np.random.default_rng(0).normal(size=(40, 4))
    np.save(tmp_path / "h.npy", x.astype(np.float16))
    capsys.readouterr()
    assert main(["cache", "--from-npy", str(tmp_path / "h.npy"), "--out", str(tmp_path / "h")]) == 0
    assert "holds float16 values; the cache stores them as float32" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "h" / "acts_00000.npy"), x.astype(np.float16).astype(np.float32)[:36])
    np.save(tmp_path / "i.npy", np.arange(40 * 4).reshape(40, 4))
    _fails(capsys, ["cache", "--from-npy", str(tmp_path / "i.npy"), "--out", str(tmp_path / "i")], "int64", "float32")
    (tmp_path / "t.npy").write_text("1 2 3\n4 5 6\n")
    err = _fails(capsys, ["cache", "--from-npy", str(tmp_path / "t.npy"), "--out", str(tmp_path / "t")], "numpy.save")
    assert "allow_pickle" not in err
    assert not any((tmp_path / d).exists() for d in ("i", "t"))


def test_evaluate_reports_recovery_of_the_synthetic_true_features(acts, run, tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate", str(run), "--activations", str(acts), "--json", str(out), "--quiet"]) == 0
    r = json.loads(out.read_text())["feature_recovery"]
    from saeens import ensemble
    from saeens.synthetic import feature_recovery
    from saeens.train import load_ensemble

    W = np.asarray(ensemble.decoder(load_ensemble(run)[0]))
    assert r == pytest.approx(feature_recovery(np.load(acts / "true_features.npy"), W)) and 0 < r <= 1


def test_demo_writes_to_the_user_cache_by_default_and_its_help_names_every_method(monkeypatch, tmp_path, capsys):
    from saeens import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_out() == tmp_path / "xdg" / "saeens" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_out() == tmp_path / "home" / ".cache" / "saeens" / "demo"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(m in text for m in ("single", "expanded", "bagging", "boosting")) and "~/.cache" in text


def test_the_command_silences_transformers_torch_advice(tmp_path):
    """saeens needs only transformers' tokenizers: its 'PyTorch was not found' advice is noise."""
    import subprocess
    import sys

    code = ("import os; from saeens.cli import main; main(['stability', 'nope']); "
            "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "1", r.stderr


def test_the_parser_loads_no_jax():
    """`saeens --help` and argument errors answer at once: building the parser imports neither JAX nor Flax."""
    import subprocess
    import sys

    code = "import sys; import saeens.cli as c; c.build_parser(); print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
