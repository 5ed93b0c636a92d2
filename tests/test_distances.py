"""Image distances (l1, ssim, lpips) and LPIPS weights handling, without any download.

LPIPS runs here on randomly initialised (seeded) torchvision trunks saved to a
temporary file: the code path is the real one (hash check, weights_only load,
key mapping), only the numbers differ from the ImageNet trunk.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from carve3d_reward import weights
from carve3d_reward.distances import (
    DISTANCES,
    Distance,
    L1Distance,
    LPIPSDistance,
    SSIMDistance,
    build_distance,
)
from carve3d_reward.errors import ConfigError, MRCError, WeightsMismatchError, WeightsMissingError

SIZE = 48


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(state: dict[str, torch.Tensor], path: Path) -> tuple[Path, str]:
    torch.save(state, path)
    return path, _sha(path)


# -- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alex_trunk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A full torchvision AlexNet state dict (random, seeded) and its sha256."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = torchvision.models.alexnet().state_dict()
    return _save(state, tmp_path_factory.mktemp("alex") / "alexnet-random.pth")


@pytest.fixture(scope="module")
def alex_features(alex_trunk: tuple[Path, str]) -> dict[str, torch.Tensor]:
    """Only the ``features.*`` part of :func:`alex_trunk` (10 MB instead of 233 MB)."""
    state = torch.load(alex_trunk[0], map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("features.")}


@pytest.fixture(scope="module")
def lpips_alex(alex_trunk: tuple[Path, str]) -> LPIPSDistance:
    path, sha = alex_trunk
    d = build_distance("lpips-alex", trunk_path=path, trunk_sha256=sha)
    assert isinstance(d, LPIPSDistance)
    return d


@pytest.fixture(scope="module")
def distances(lpips_alex: LPIPSDistance) -> dict[str, Distance]:
    return {"l1": build_distance("l1"), "ssim": build_distance("ssim"), "lpips-alex": lpips_alex}


@pytest.fixture(params=["l1", "ssim", "lpips-alex"])
def dist(request: pytest.FixtureRequest, distances: dict[str, Distance]) -> Distance:
    return distances[request.param]


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (smooth-ish random images), a small and a large perturbation of it; ``[4, 3, SIZE, SIZE]`` in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(4, 3, SIZE // 8, SIZE // 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    noise = torch.randn(x.shape, generator=g)
    return x, (x + 0.03 * noise).clamp(0, 1), (x + 0.3 * noise).clamp(0, 1)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME (env and torch.hub's dir), both restored afterwards; returns the checkpoints dir."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored on teardown
    torch.hub.set_dir(str(tmp_path / "torch" / "hub"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert weights.LPIPS_TRUNKS["alex"].default_path().parent == checkpoints
    return checkpoints


def _spec_for(path: Path, sha: str) -> weights.WeightsSpec:
    """A spec whose filename carries ``sha``'s prefix (so a local file can stand in for a download)."""
    return weights.WeightsSpec(url="https://example.invalid/trunk.pth", filename=f"alexnet-test-{sha[:8]}.pth")


# -- all distances ---------------------------------------------------------------------------------------------------
def test_identical_inputs_give_zero(dist: Distance, images) -> None:
    x, _, _ = images
    assert torch.equal(dist(x, x), torch.zeros(x.shape[0]))


def test_different_inputs_positive_and_ordered(dist: Distance, images) -> None:
    x, small, large = images
    d_small, d_large = dist(x, small), dist(x, large)
    assert (d_small > 0).all()
    assert (d_small < d_large).all(), (d_small, d_large)


def test_shape_dtype_and_worst(dist: Distance, images) -> None:
    x, small, _ = images
    out = dist(x, small)
    assert out.shape == (x.shape[0],) and out.dtype == torch.float32
    assert dist.worst == 1.0 and dist.name in DISTANCES
    assert dist(x[:0], small[:0]).shape == (0,)


def test_non_fp32_inputs_are_computed_in_fp32(dist: Distance, images) -> None:
    x, small, _ = images
    ref = dist(x, small)
    out = dist(x.double(), small.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not leak into the distance
        torch.testing.assert_close(dist(x, small), ref, rtol=0, atol=0)


def test_batch_equals_per_sample(dist: Distance, images) -> None:
    x, small, _ = images
    batch = dist(x, small)
    single = torch.cat([dist(x[i : i + 1], small[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-7)


def test_deterministic(dist: Distance, images) -> None:
    x, _, large = images
    assert torch.equal(dist(x, large), dist(x, large))


def test_eval_mode_pinned(dist: Distance) -> None:
    dist.train()
    assert not dist.training and not any(m.training for m in dist.modules())


def test_input_contract(dist: Distance, images) -> None:
    x, small, _ = images
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        dist(2 * x - 1, small)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        dist(x * 255, small)
    with pytest.raises(ValueError, match="float"):
        dist((x * 255).to(torch.uint8), small)
    with pytest.raises(ValueError, match="shape"):
        dist(x, small[:2])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        dist(x[:, :1], small[:, :1])
    with pytest.raises(ValueError, match="NaN"):
        dist(x.clone().fill_(float("nan")), small)
    # Resampling overshoot within one 8-bit level is clamped, not an error.
    torch.testing.assert_close(dist(x * 1.001, small), dist(x.clamp(max=1 / 1.001) * 1.001, small))


# -- l1 / ssim -------------------------------------------------------------------------------------------------------
def test_l1_matches_hand_computation() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0, 0] = 1.0  # one channel fully different: 16 of 48 values differ by 1
    b[1] = 0.25  # everything differs by 0.25
    torch.testing.assert_close(L1Distance()(a, b), torch.tensor([1 / 3, 0.25]))


def test_ssim_in_unit_interval() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=g)
    d = SSIMDistance()
    for y in (1 - x, torch.rand(x.shape, generator=g), torch.ones_like(x), torch.zeros_like(x)):
        out = d(x, y)
        assert ((out >= 0) & (out <= 1)).all(), out
    assert (d(x, 1 - x) > 0.5).all()  # anti-correlated images: SSIM < 0


def test_ssim_small_images_are_a_config_error() -> None:
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="at least 11x11"):
        SSIMDistance()(x, x)
    assert SSIMDistance(win_size=7)(x, x).item() == 0.0
    with pytest.raises(ConfigError, match="odd"):
        SSIMDistance(win_size=4)


def test_unknown_distance_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="lpips-alex") as e:
        build_distance("lpips-squeeze")
    for name in ("l1", "ssim", "lpips-alex", "lpips-vgg"):
        assert name in str(e.value)


# -- LPIPS -----------------------------------------------------------------------------------------------------------
def test_lpips_model_state(lpips_alex: LPIPSDistance) -> None:
    assert not lpips_alex.training and not lpips_alex.model.training
    params = list(lpips_alex.parameters())
    assert params and all(p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert lpips_alex.fingerprint.startswith("alex-")


def test_lpips_trunk_weights_are_the_files(lpips_alex: LPIPSDistance, alex_features) -> None:
    sd = lpips_alex.model.net.state_dict()
    assert torch.equal(sd["slice1.0.weight"], alex_features["features.0.weight"])
    assert torch.equal(sd["slice5.10.bias"], alex_features["features.10.bias"])
    assert len(sd) == len(alex_features)


def test_lpips_scales_inputs_to_minus_one_one(lpips_alex: LPIPSDistance, images) -> None:
    x, _, large = images
    with torch.no_grad():
        raw = lpips_alex.model(2 * x - 1, 2 * large - 1).flatten()
        unscaled = lpips_alex.model(x, large).flatten()
    torch.testing.assert_close(lpips_alex(x, large), raw, rtol=0, atol=0)
    assert not torch.allclose(raw, unscaled)


def test_lpips_build_keeps_global_rng(alex_trunk) -> None:
    state = torch.get_rng_state()
    build_distance("lpips-alex", trunk_path=alex_trunk[0])  # explicit path, no sha: loads unchecked
    assert torch.equal(state, torch.get_rng_state())


def test_lpips_too_small_is_a_config_error(lpips_alex: LPIPSDistance) -> None:
    x = torch.rand(1, 3, 24, 24)
    with pytest.raises(ConfigError, match="at least 31x31"):
        lpips_alex(x, x)


def test_lpips_refuses_half_parameters(alex_trunk, images) -> None:
    d = build_distance("lpips-alex", trunk_path=alex_trunk[0], trunk_sha256=alex_trunk[1]).half()
    with pytest.raises(ValueError, match="float32"):
        d(images[0], images[1])


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_without_weights_names_fetch_command(torch_home: Path, net: str) -> None:
    with pytest.raises(WeightsMissingError) as e:
        build_distance(f"lpips-{net}")
    msg = str(e.value)
    assert f"mrc weights fetch --lpips {net}" in msg
    assert "TORCH_HOME" in msg and "MRC_LPIPS_TRUNK_PATH" in msg
    assert str(torch_home) in msg and "\n" not in msg


def test_explicit_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsMissingError, match="does not exist"):
        build_distance("lpips-alex", trunk_path=tmp_path / "nope.pth")


def test_lpips_wrong_sha256(alex_trunk) -> None:
    path, sha = alex_trunk
    wrong = ("0" if sha[0] != "0" else "1") + sha[1:]
    with pytest.raises(WeightsMismatchError) as e:
        build_distance("lpips-alex", trunk_path=path, trunk_sha256=wrong)
    assert str(path) in str(e.value) and wrong in str(e.value) and sha in str(e.value)


def test_lpips_malformed_sha256(alex_trunk) -> None:
    with pytest.raises(ConfigError, match="hex"):
        build_distance("lpips-alex", trunk_path=alex_trunk[0], trunk_sha256="abc")


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not-a-state-dict"])
def test_lpips_corrupt_file_is_a_clear_error(tmp_path: Path, alex_features, kind: str) -> None:
    good, _ = _save(alex_features, tmp_path / "good.pth")
    bad = tmp_path / "bad.pth"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[: 1 << 20])
    elif kind == "garbage":
        bad.write_bytes(b"\x80\x04this is not a checkpoint" * 100)
    else:
        torch.save([1, 2, 3], bad)
    with pytest.raises(MRCError, match=str(bad)):
        build_distance("lpips-alex", trunk_path=bad)


def test_lpips_missing_key_is_named(tmp_path: Path, alex_features) -> None:
    state = {k: v for k, v in alex_features.items() if k != "features.6.weight"}
    path, sha = _save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsMismatchError, match=r"1 missing \(features\.6\.weight\)"):
        build_distance("lpips-alex", trunk_path=path, trunk_sha256=sha)


def test_lpips_unexpected_and_misshapen_keys(tmp_path: Path, alex_features) -> None:
    state = dict(alex_features) | {"features.1.running_mean": torch.zeros(64)}
    state["features.3.bias"] = torch.zeros(7)
    path, _ = _save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsMismatchError) as e:
        build_distance("lpips-alex", trunk_path=path)
    assert "1 unexpected (features.1.running_mean)" in str(e.value)
    assert "features.3.bias: file [7], model [192]" in str(e.value)


def test_default_location_hash_mismatch(torch_home: Path) -> None:
    torch_home.mkdir(parents=True)
    (torch_home / "alexnet-owt-7be5be79.pth").write_bytes(b"not alexnet")
    with pytest.raises(WeightsMismatchError) as e:
        build_distance("lpips-alex")
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and "7be5be79" in msg and "mrc weights fetch --lpips alex" in msg


def test_default_location_valid_file_loads(torch_home: Path, alex_features, monkeypatch, images) -> None:
    torch_home.mkdir(parents=True)
    tmp, sha = _save(alex_features, torch_home / "tmp.pth")
    spec = _spec_for(tmp, sha)
    tmp.rename(torch_home / spec.filename)
    monkeypatch.setitem(weights.LPIPS_TRUNKS, "alex", spec)
    d = build_distance("lpips-alex")
    assert d.trunk_path == torch_home / spec.filename
    assert d.fingerprint.startswith(f"alex-{sha[:8]}")
    x, small, _ = images
    assert (d(x, small) > 0).all()


@pytest.mark.slow
def test_lpips_vgg_with_random_features(tmp_path: Path, images) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    path, sha = _save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg.pth")
    d = build_distance("lpips-vgg", trunk_path=path, trunk_sha256=sha)
    assert d.name == "lpips-vgg" and not d.training
    assert torch.equal(d.model.net.state_dict()["slice5.28.weight"], features.state_dict()["28.weight"])
    x, small, large = images
    assert torch.equal(d(x, x), torch.zeros(x.shape[0]))
    assert (d(x, small) > 0).all() and (d(x, small) < d(x, large)).all()


# -- weights helpers and fetching ------------------------------------------------------------------------------------
def test_verify_sha256(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"hello")
    full = hashlib.sha256(b"hello").hexdigest()
    assert weights.file_sha256(f) == full
    assert weights.verify_sha256(f, full) == full
    assert weights.verify_sha256(f, full[:8].upper()) == full
    with pytest.raises(ConfigError):
        weights.verify_sha256(f, full[:7])
    with pytest.raises(WeightsMismatchError) as e:
        weights.verify_sha256(f, "deadbeef")
    assert str(f) in str(e.value) and "deadbeef" in str(e.value) and full in str(e.value)


def test_trunk_specs() -> None:
    assert weights.LPIPS_TRUNKS["alex"].hash_prefix == "7be5be79"
    assert weights.LPIPS_TRUNKS["vgg"].hash_prefix == "397923af"
    assert weights.LPIPS_TRUNKS["alex"].url.endswith("/alexnet-owt-7be5be79.pth")
    with pytest.raises(ConfigError, match="alex"):
        weights.trunk_weights_path("squeeze")


def test_fetch_offline_is_a_clear_error(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def offline(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        seen.update(url=url, dst=dst, hash_prefix=hash_prefix, timeout=socket.getdefaulttimeout())
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(WeightsMissingError) as e:
        weights.fetch_lpips_trunk("alex", progress=False)
    msg = str(e.value)
    assert msg.startswith("could not download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
    assert "name resolution" in msg and str(torch_home / "alexnet-owt-7be5be79.pth") in msg and "\n" not in msg
    assert seen["hash_prefix"] == "7be5be79" and seen["timeout"] == weights.DOWNLOAD_TIMEOUT_S
    assert socket.getdefaulttimeout() == before


def test_fetch_downloads_once_and_checks_hash(torch_home: Path, alex_features, monkeypatch, tmp_path) -> None:
    src, sha = _save(alex_features, tmp_path / "src.pth")
    monkeypatch.setitem(weights.LPIPS_TRUNKS, "alex", _spec_for(src, sha))
    calls: list[str | None] = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append(hash_prefix)
        shutil.copyfile(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = weights.fetch_lpips_trunk("alex", progress=False)
    assert path == torch_home / f"alexnet-test-{sha[:8]}.pth" and _sha(path) == sha
    assert weights.fetch_lpips_trunk("alex", progress=False) == path
    assert calls == [sha[:8]]  # the second call found a valid copy
    assert weights.trunk_weights_path("alex") == path


def test_fetch_bad_download_hash(torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "00ff")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", bad)
    with pytest.raises(WeightsMismatchError, match="invalid hash value"):
        weights.fetch_lpips_trunk("vgg", progress=False)
