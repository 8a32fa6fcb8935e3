"""SAELens export: files that the REAL sae_lens loads and that compute what saeens computes."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble, sae
from saeens.config import SAEConfig
from saeens.errors import SaeensError
from saeens.io.export import export_saelens, load_export, load_saelens

import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402 - a declared test dependency: a broken install fails, never skips

D, M, K = 12, 16, 4
ARCHS = ("relu", "topk", "jumprelu", "batchtopk")
SAELENS_CLASS = {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE"}
ATOL = 1e-5


J_MAX = 3  # one compiled generator per architecture; smaller ensembles take the first members


@partial(jax.jit, static_argnums=(0, 1))
def _random_params(cfg: SAEConfig, J: int, key: jax.Array) -> dict:
    k_init, k_enc, k_benc, k_bdec, k_thr = jax.random.split(key, 5)
    params = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(k_init, J))
    params["W_enc"] = params["W_enc"] + 0.2 * jax.random.normal(k_enc, params["W_enc"].shape)
    params["b_enc"] = 0.3 * jax.random.normal(k_benc, (J, M))
    params["b_dec"] = 0.5 * jax.random.normal(k_bdec, (J, D))
    if cfg.arch == "jumprelu":
        params["log_threshold"] = jnp.log(0.2) + 0.5 * jax.random.normal(k_thr, (J, M))
    if cfg.arch == "batchtopk":
        params["threshold"] = 0.1 + 0.3 * jax.random.uniform(k_thr, (J, M))
    return params


def make_params(arch: str, J: int, seed: int = 0) -> tuple[SAEConfig, dict]:
    """J random members (sae.init under vmap) with non-trivial biases, encoders and thresholds."""
    cfg = SAEConfig(d_in=D, width=M, arch=arch, k=K)
    params = _random_params(cfg, J_MAX, jax.random.fold_in(_KEY, seed))
    return cfg, {k: jax.device_put(np.asarray(v)[:J]) for k, v in params.items()}


_KEY = jax.random.key(0)


def inputs(seed: int = 1, n: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


@partial(jax.jit, static_argnums=1)
def _sae_forward(params: dict, cfg: SAEConfig, x: jax.Array):
    return sae.forward(params, cfg, x)


def sae_forward(params: dict, cfg: SAEConfig, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """saeens' (reconstruction, codes) of one SAE, as numpy."""
    recon, codes = _sae_forward(params, cfg, jnp.asarray(x))
    return np.asarray(recon), np.asarray(codes)


@jax.jit
def _ens_forward(ens: ensemble.Ensemble, x: jax.Array):
    return ensemble.forward(ens, x)


def ens_forward(ens: ensemble.Ensemble, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """saeens' ensemble (reconstruction, weighted concatenated codes), as numpy."""
    recon, codes = _ens_forward(ens, jnp.asarray(x))
    return np.asarray(recon), np.asarray(codes)


def member(ens: ensemble.Ensemble, j: int) -> dict:
    return {k: np.asarray(v)[j] for k, v in ens.params.items()}


def sl_load(path: Path):
    return SAE.load_from_disk(str(path), device="cpu")


def sl_encode(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode(torch.from_numpy(np.array(x, np.float32))).numpy()


def sl_decode(model, codes: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.from_numpy(np.array(codes, np.float32))).numpy()


def sl_forward(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x, np.float32))).numpy()


def assert_tree_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("arch", ARCHS)
def test_single_sae_loads_in_saelens_and_matches(arch, tmp_path):
    cfg, params_J = make_params(arch, 1)
    ens = ensemble.bagging(cfg, params_J)  # J = 1: weight 1, not sequential, i.e. ensemble.single
    p = member(ens, 0)
    out = export_saelens(ens, "single", tmp_path / "sae", hook_name="blocks.3.hook_resid_post", model_name="tiny")
    assert sorted(f.name for f in out.iterdir() if f.name != "saeens_extra.safetensors") == [
        "cfg.json",
        "sae_weights.safetensors",
    ]
    cfg_json = json.loads((out / "cfg.json").read_text())
    assert cfg_json["architecture"] == {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert (cfg_json["d_in"], cfg_json["d_sae"], cfg_json["dtype"]) == (D, M, "float32")
    assert cfg_json["apply_b_dec_to_input"] is True and cfg_json["normalize_activations"] == "none"
    assert cfg_json["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg_json["metadata"]["model_name"] == "tiny"
    if arch == "batchtopk":
        assert cfg_json["metadata"]["training_architecture"] == "batchtopk"

    model = sl_load(out)
    assert type(model).__name__ == SAELENS_CLASS[arch]
    assert model.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    if arch == "topk":
        assert model.cfg.k == K
    x = inputs()
    recon, codes = sae_forward(p, cfg, x)  # recon = sae.decode(p, codes), codes = sae.encode(p, cfg, x)
    assert 0 < (codes > 0).mean() < 1  # non-trivial sparsity pattern
    np.testing.assert_allclose(sl_encode(model, x), codes, atol=ATOL, rtol=0)
    np.testing.assert_allclose(sl_decode(model, codes), recon, atol=ATOL, rtol=0)
    np.testing.assert_allclose(sl_forward(model, x), recon, atol=ATOL, rtol=0)

    # our reader is the exact inverse
    cfg2, p2 = load_saelens(out)
    assert cfg2 == cfg
    assert_tree_equal(p2, p)
    back = load_export(out)
    assert back.n_members == 1 and back.cfg == cfg and not back.sequential
    assert_tree_equal(member(back, 0), p)


def test_topk_semantics_match_saelens_when_fewer_than_k_positive(tmp_path):
    """SAELens' TopK takes the top k, then ReLU: the same as saeens' topk_codes."""
    cfg, params_J = make_params("topk", 1)
    params_J["b_enc"] = np.asarray(params_J["b_enc"]) - 2.5  # most pre-activations negative
    ens = ensemble.boosting(cfg, params_J)
    out = export_saelens(ens, "boosting", tmp_path / "e")
    x = inputs(seed=5)
    _, codes = sae_forward(member(ens, 0), cfg, x)
    assert ((codes > 0).sum(-1) < K).any()  # some rows keep fewer than k positive latents
    np.testing.assert_allclose(sl_encode(sl_load(out / "stage_0"), x), codes, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_bagging_exports_members_and_the_one_equivalent_sae(arch, tmp_path):
    J = 3
    cfg, params_J = make_params(arch, J, seed=2)
    ens = ensemble.bagging(cfg, params_J)
    out = export_saelens(ens, "bagging", tmp_path / "bag", hook_name="h", model_name="m")
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "bagging" and man["members"] == J
    assert man["member_dirs"] == man["order"] == [f"member_{j}" for j in range(J)]
    assert man["weights"] == [float(np.float32(1 / J))] * J
    assert man["combine"] == "mean of member reconstructions"
    assert man["single_equivalent"] == "." and man["saeens_version"]
    x = inputs(seed=3)

    # the SAE at DIR is the whole ensemble (Proposition 1); BatchTopK's single form is JumpReLU
    single = sl_load(out)
    assert type(single).__name__ == ("StandardSAE" if arch == "relu" else "JumpReLUSAE")
    assert single.cfg.d_sae == J * M
    want, want_codes = ens_forward(ens, x)
    np.testing.assert_allclose(sl_forward(single, x), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(sl_encode(single, x), want_codes, atol=ATOL, rtol=0)

    # every member is an SAELens SAE of its own, and their mean is the ensemble
    recons = []
    for j in range(J):
        model = sl_load(out / f"member_{j}")
        recon_j, codes_j = sae_forward(member(ens, j), cfg, x)
        np.testing.assert_allclose(sl_encode(model, x), codes_j, atol=ATOL, rtol=0)
        np.testing.assert_allclose(sl_forward(model, x), recon_j, atol=ATOL, rtol=0)
        recons.append(sl_forward(model, x))
    np.testing.assert_allclose(np.mean(recons, axis=0), want, atol=ATOL, rtol=0)

    back = load_export(out)
    assert back.cfg == cfg and not back.sequential
    assert_tree_equal(back.params, ens.params)
    np.testing.assert_array_equal(np.asarray(back.weights), np.asarray(ens.weights))
    cfg1, _ = load_saelens(out)
    assert cfg1.width == J * M and cfg1.arch == ("relu" if arch == "relu" else "jumprelu")


def test_topk_bagging_writes_members_and_no_single_sae(tmp_path):
    J = 2
    cfg, params_J = make_params("topk", J, seed=4)
    ens = ensemble.bagging(cfg, params_J)
    out = export_saelens(ens, "bagging", tmp_path / "bag")
    assert not (out / "cfg.json").exists() and not (out / "sae_weights.safetensors").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["single_equivalent"] is None and "TopK" in man["single_equivalent_reason"]
    assert man["combine"] == "mean of member reconstructions"
    x = inputs(seed=6)
    recons = [sl_forward(sl_load(out / f"member_{j}"), x) for j in range(J)]
    np.testing.assert_allclose(np.mean(recons, axis=0), ens_forward(ens, x)[0], atol=ATOL, rtol=0)
    back = load_export(out)
    assert back.cfg == cfg
    assert_tree_equal(back.params, ens.params)


@pytest.mark.parametrize("arch", ARCHS)
def test_boosting_writes_stages_in_order(arch, tmp_path):
    J = 3
    cfg, params_J = make_params(arch, J, seed=7)
    ens = ensemble.boosting(cfg, params_J)
    out = export_saelens(ens, "boosting", tmp_path / "boost", hook_name="h")
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "boosting" and man["sequential"] is True
    assert man["order"] == [f"stage_{j}" for j in range(J)]
    assert man["combine"] == "sum of stage reconstructions on residuals"
    assert man["weights"] == [1.0] * J and man["single_equivalent"] is None
    assert not (out / "cfg.json").exists()

    # the stages applied on residuals with SAELens reproduce the ensemble
    x = inputs(seed=8)
    r, total = x, np.zeros_like(x)
    for name in man["order"]:
        g = sl_forward(sl_load(out / name), r)
        total, r = total + g, r - g
    np.testing.assert_allclose(total, ens_forward(ens, x)[0], atol=ATOL, rtol=0)

    back = load_export(out)
    assert back.cfg == cfg and back.sequential
    assert_tree_equal(back.params, ens.params)
    np.testing.assert_array_equal(np.asarray(back.weights), np.asarray(ens.weights))


def test_refuses_non_empty_dir_and_leaves_it_untouched(tmp_path):
    cfg, params_J = make_params("relu", 2)
    ens = ensemble.bagging(cfg, params_J)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SaeensError) as e:
        export_saelens(ens, "bagging", out)
    assert "not empty" in str(e.value) and "\n" not in str(e.value)
    assert [f.name for f in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["taken"]  # no temp dir left behind
    # an existing EMPTY directory is fine
    (tmp_path / "empty").mkdir()
    export_saelens(ens, "bagging", tmp_path / "empty")
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_failed_export_writes_nothing(tmp_path):
    cfg, params_J = make_params("jumprelu", 2)
    params_J["W_dec"] = np.array(params_J["W_dec"])
    params_J["W_dec"][1, 0, 0] = np.nan
    with pytest.raises(SaeensError, match="NaN"):
        export_saelens(ensemble.bagging(cfg, params_J), "bagging", tmp_path / "x")
    cfg, params_J = make_params("batchtopk", 1)
    params_J["threshold"] = np.array(params_J["threshold"])
    params_J["threshold"][0, 3] = -0.5
    with pytest.raises(SaeensError, match="negative"):
        export_saelens(ensemble.bagging(cfg, params_J), "single", tmp_path / "y")
    assert list(tmp_path.iterdir()) == []


def test_method_must_match_the_ensemble(tmp_path):
    cfg, params_J = make_params("relu", 2)
    with pytest.raises(SaeensError, match="members"):
        export_saelens(ensemble.bagging(cfg, params_J), "single", tmp_path / "a")
    with pytest.raises(SaeensError, match="sequential"):
        export_saelens(ensemble.bagging(cfg, params_J), "boosting", tmp_path / "b")
    with pytest.raises(SaeensError, match="boosting"):
        export_saelens(ensemble.boosting(cfg, params_J), "bagging", tmp_path / "c")
    with pytest.raises(SaeensError, match="d_in"):
        export_saelens(ensemble.bagging(cfg, params_J), "bagging", tmp_path / "d", d_in=D + 1)
    assert list(tmp_path.iterdir()) == []


def test_activation_scale_is_folded_into_the_export(tmp_path):
    cfg, params_J = make_params("jumprelu", 1, seed=9)
    ens = ensemble.bagging(cfg, params_J)
    s = 3.7  # trained on s * x
    out = export_saelens(ens, "single", tmp_path / "s", scale=s)
    x = inputs(seed=10)
    want = sae_forward(member(ens, 0), cfg, s * x)[0] / s
    np.testing.assert_allclose(sl_forward(sl_load(out), x), want, atol=ATOL, rtol=0)


def test_loader_errors_are_one_line(tmp_path):
    cfg, params_J = make_params("relu", 1)
    out = export_saelens(ensemble.boosting(cfg, params_J), "single", tmp_path / "s")
    cfg_json = json.loads((out / "cfg.json").read_text())
    cfg_json["architecture"] = "gated"
    (out / "cfg.json").write_text(json.dumps(cfg_json))
    for path in (out, tmp_path / "nowhere"):
        with pytest.raises(SaeensError) as e:
            load_saelens(path)
        assert "\n" not in str(e.value)
    with pytest.raises(SaeensError, match="gated"):
        load_export(out)

    out2 = export_saelens(ensemble.bagging(*make_params("topk", 2)), "bagging", tmp_path / "b")
    (out2 / "member_1" / "sae_weights.safetensors").unlink()
    with pytest.raises(SaeensError, match="missing") as e:
        load_export(out2)
    assert "\n" not in str(e.value)


def test_reads_sae_lens_own_files(tmp_path):
    """load_saelens also reads what SAELens itself saves: bfloat16, apply_b_dec_to_input=false."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    gen = torch.Generator().manual_seed(0)
    x = inputs(seed=11)
    for name, model in (
        ("topk_bf16", TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K, dtype="bfloat16"))),
        ("std_nobdec", StandardSAE(StandardSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False))),
    ):
        with torch.no_grad():
            for prm in model.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen).to(prm.dtype))
        model.save_model(tmp_path / name)
        cfg, params = load_saelens(tmp_path / name)
        assert cfg.arch == ("topk" if name.startswith("topk") else "relu") and (cfg.d_in, cfg.width) == (D, M)
        ref = sl_load(tmp_path / name).to(dtype=torch.float32)  # the same bf16 weights, computed in f32
        recon, codes = sae_forward(params, cfg, x)
        np.testing.assert_allclose(sl_encode(ref, x), codes, atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(sl_forward(ref, x), recon, atol=1e-4, rtol=1e-5)
