"""The InstantMesh-compatible LRM: checkpoint layout, loading, cameras, rendering, the metric wiring.

The published checkpoints cannot be downloaded here, so their layout is
checked against a manifest derived independently of our modules (below) from
the public facts:

* ``configs/instant-nerf-{large,base}.yaml`` of ``TencentARC/InstantMesh``:
  encoder ``facebook/dino-vitb16`` (width 768), transformer width 1024 with 16
  (large) / 12 (base) layers and 16 heads, triplane 32 -> 64, 80 / 40 channels;
* ``facebook/dino-vitb16``'s ``config.json``: 12 layers, MLP 3072, patch 16,
  image 224 (a 197-entry positional table), qkv biases, no pooler used;
* the module structure of ``src/models/{encoder,decoder,renderer}`` (camera
  embedder Linear-SiLU-Linear from 16 numbers, adaLN ``Linear(768, 4 * 768)``
  per ViT layer, ``nn.MultiheadAttention`` without biases — separate q/k/v
  weights for cross-attention since the key width differs — MLP ``0``/``3``
  linears, final LayerNorm, ``ConvTranspose2d(1024, C, 2, 2)``, and a 4-layer
  width-64 ReLU MLP with linears at ``net.0/2/4/6``).

Cross-checks: large has 495 keys and 378,477,332 parameters (the 378.5M the
facts give), base 431 keys and 313,249,004; both fit the Hub LFS file sizes
(4 bytes per parameter plus ~360 bytes of pickle/zip overhead per key).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest
import torch

from carve3d_reward.cameras import Cameras
from carve3d_reward.errors import ConfigError, WeightsMismatchError, WeightsMissingError
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.lrm import PRESETS, LRMGenerator, build_generator, get_preset
from carve3d_reward.lrm.checkpoint import (
    LIGHTNING_PREFIX,
    convert_checkpoint,
    fetch_checkpoint,
    load_generator,
    read_state_dict,
    save_state_dict,
)
from carve3d_reward.lrm.config import HubFile
from carve3d_reward.lrm.model import count_parameters
from carve3d_reward.lrm.reconstructor import LRMOptions, LRMReconstructor, encoder_cameras, placed_c2w
from carve3d_reward.lrm.renderer import camera_rays, render_field
from carve3d_reward.metric import MRC
from carve3d_reward.settings import LRMPresetName, MetricSettings
from carve3d_reward.weights import file_sha256

TINY = get_preset("tiny")


# -- the public checkpoints' layout ----------------------------------------------------------------------------------
def public_manifest(decoder_layers: int, channels: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an InstantMesh NeRF ``lrm_generator`` state dict, written out from the public facts."""
    e, d, t, hidden = 768, 1024, 32, 64
    m: dict[str, tuple[int, ...]] = {}

    def linear(name: str, d_out: int, d_in: int, bias: bool = True) -> None:
        m[f"{name}.weight"] = (d_out, d_in)
        if bias:
            m[f"{name}.bias"] = (d_out,)

    def norm(name: str, width: int) -> None:
        m[f"{name}.weight"], m[f"{name}.bias"] = (width,), (width,)

    linear("encoder.camera_embedder.0", e, 16)
    linear("encoder.camera_embedder.2", e, e)
    vit = "encoder.model."
    m[vit + "embeddings.cls_token"] = (1, 1, e)
    m[vit + "embeddings.position_embeddings"] = (1, 1 + 14 * 14, e)
    m[vit + "embeddings.patch_embeddings.projection.weight"] = (e, 3, 16, 16)
    m[vit + "embeddings.patch_embeddings.projection.bias"] = (e,)
    for i in range(12):
        layer = f"{vit}encoder.layer.{i}."
        for qkv in ("query", "key", "value"):
            linear(layer + f"attention.attention.{qkv}", e, e)
        linear(layer + "attention.output.dense", e, e)
        linear(layer + "intermediate.dense", 4 * e, e)
        linear(layer + "output.dense", e, 4 * e)
        norm(layer + "layernorm_before", e)
        norm(layer + "layernorm_after", e)
        linear(layer + "adaLN_modulation.1", 4 * e, e)
    norm(vit + "layernorm", e)
    m["transformer.pos_embed"] = (1, 3 * t * t, d)
    for i in range(decoder_layers):
        block = f"transformer.layers.{i}."
        norm(block + "norm1", d)
        m[block + "cross_attn.q_proj_weight"] = (d, d)
        m[block + "cross_attn.k_proj_weight"] = (d, e)
        m[block + "cross_attn.v_proj_weight"] = (d, e)
        linear(block + "cross_attn.out_proj", d, d, bias=False)
        norm(block + "norm2", d)
        m[block + "self_attn.in_proj_weight"] = (3 * d, d)
        linear(block + "self_attn.out_proj", d, d, bias=False)
        norm(block + "norm3", d)
        linear(block + "mlp.0", 4 * d, d)
        linear(block + "mlp.3", d, 4 * d)
    norm("transformer.norm", d)
    m["transformer.deconv.weight"] = (d, channels, 2, 2)
    m["transformer.deconv.bias"] = (channels,)
    widths = [3 * channels, hidden, hidden, hidden, 4]
    for k in range(4):
        linear(f"synthesizer.decoder.net.{2 * k}", widths[k + 1], widths[k])
    return m


@pytest.mark.parametrize(
    ("preset", "layers", "channels", "keys", "params"),
    [("instant-nerf-large", 16, 80, 495, 378_477_332), ("instant-nerf-base", 12, 40, 431, 313_249_004)],
)
def test_public_presets_have_the_checkpoint_layout(preset, layers, channels, keys, params) -> None:
    config = get_preset(preset)
    model = build_generator(config, device="meta")  # shapes only: no memory
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = public_manifest(layers, channels)
    assert len(expected) == keys
    assert sum(math.prod(s) for s in expected.values()) == params
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert count_parameters(model) == params
    assert config.hub is not None and config.hub.repo_id == "TencentARC/InstantMesh"
    overhead = config.hub.size_bytes - 4 * params  # float32 tensors + pickle/zip metadata
    assert 0 < overhead < 512 * keys


def test_large_is_the_378_5m_model_of_the_facts() -> None:
    assert round(count_parameters(build_generator(get_preset("instant-nerf-large"), device="meta")) / 1e6, 1) == 378.5


def test_settings_offer_exactly_the_presets() -> None:
    assert set(get_args(LRMPresetName)) == set(PRESETS)
    with pytest.raises(ConfigError, match="known: instant-nerf-base, instant-nerf-large, tiny"):
        get_preset("huge")


# -- saving and loading ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model() -> LRMGenerator:
    torch.manual_seed(0)
    model = build_generator(TINY).eval()
    with torch.no_grad():  # non-trivial camera modulation (fresh adaLN layers are near identity)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory) -> Path:
    return save_state_dict(tiny_model, tmp_path_factory.mktemp("lrm") / "tiny.ckpt")


@pytest.fixture(scope="module")
def cams() -> Cameras:
    return INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    v = torch.ones(3, 4, 3, 32, 32)
    v[:, :, :, 8:24, 10:22] = torch.rand(3, 4, 3, 16, 12, generator=g)
    return v


def _outputs(model: LRMGenerator, views: torch.Tensor, cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
    rec = LRMReconstructor(model, digest="0" * 64)
    scene = rec.reconstruct(views, cams)
    return scene.planes, rec.render(scene, cams, 24)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_load_round_trip_is_bit_identical(tiny_model, views, cams, tmp_path, suffix) -> None:
    path = save_state_dict(tiny_model, tmp_path / f"tiny{suffix}")
    loaded = load_generator(TINY, path)
    planes_a, render_a = _outputs(tiny_model, views, cams)
    planes_b, render_b = _outputs(loaded, views, cams)
    assert torch.equal(planes_a, planes_b) and torch.equal(render_a, render_b)
    assert all(not p.is_meta and p.dtype == torch.float32 for p in loaded.parameters())


def test_lightning_checkpoint_with_metadata_loads_weights_only(tiny_model, tmp_path) -> None:
    """What a Lightning .ckpt holds besides weights (numbers, strings, dicts, lists) passes weights_only."""
    state = {LIGHTNING_PREFIX + k: v for k, v in tiny_model.state_dict().items()}
    state["lpips.net.slice1.0.weight"] = torch.zeros(2)  # other modules of the training wrapper are dropped
    ckpt = {
        "epoch": 3,
        "global_step": 12000,
        "pytorch-lightning_version": "2.1.0",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "/x", "k": 1.5}},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    path = tmp_path / "lightning.ckpt"
    torch.save(ckpt, path)
    sd = read_state_dict(path)
    assert set(sd) == set(tiny_model.state_dict())
    assert torch.equal(_outputs(load_generator(TINY, path), *_inputs())[1], _outputs(tiny_model, *_inputs())[1])


def _inputs() -> tuple[torch.Tensor, Cameras]:
    return torch.full((1, 4, 3, 16, 16), 0.5), INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)


def test_checkpoint_with_python_objects_needs_an_explicit_conversion(tiny_model, tmp_path) -> None:
    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": tiny_model.state_dict(), "hyper_parameters": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(WeightsMismatchError, match=r"--trust-pickle"):
        load_generator(TINY, path)
    out = convert_checkpoint(path, tmp_path / "objects.safetensors", trust_pickle=True)
    assert torch.equal(_outputs(load_generator(TINY, out), *_inputs())[1], _outputs(tiny_model, *_inputs())[1])


def test_wrong_checkpoint_is_one_clear_error(tiny_model, tmp_path) -> None:
    sd = dict(tiny_model.state_dict())
    sd.pop("transformer.norm.bias")
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["transformer.deconv.bias"] = torch.zeros(5)
    path = save_state_dict(sd, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsMismatchError) as info:
        load_generator(TINY, path)
    msg = str(info.value)
    assert "1 missing (transformer.norm.bias)" in msg and "1 unexpected (encoder.extra.weight)" in msg
    assert "transformer.deconv.bias: file [5], model [8]" in msg and "\n" not in msg


def test_a_checkpoint_of_another_preset_is_named(tiny_ckpt) -> None:
    with pytest.raises(WeightsMismatchError, match="fits preset 'tiny'"):
        load_generator(replace(TINY, name="custom", triplane_channels=4), tiny_ckpt)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_checkpoint_is_a_clear_error(tiny_model, tmp_path, suffix) -> None:
    path = save_state_dict(tiny_model, tmp_path / f"cut{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsMismatchError, match="truncated or not a checkpoint"):
        load_generator(TINY, path)


def test_checkpoint_hash_is_checked(tiny_ckpt) -> None:
    with pytest.raises(WeightsMismatchError, match="does not match"):
        load_generator(TINY, tiny_ckpt, sha256="00000000")
    load_generator(TINY, tiny_ckpt, sha256=file_sha256(tiny_ckpt)[:12])


# -- cameras ---------------------------------------------------------------------------------------------------------
def test_encoder_camera_vector_of_tile_0(cams) -> None:
    """Tile 0: azimuth 0, elevation 20, radius 2.7, fov 50 (c2w[:3, :4] row-major, then fx, fy, cx, cy)."""
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    f = 0.5 / math.tan(math.radians(25))
    expected = torch.tensor(
        [0.0, -s, c, 2.7 * c, 1.0, 0.0, 0.0, 0.0, 0.0, c, s, 2.7 * s, f, f, 0.5, 0.5], dtype=torch.float32
    )
    vec = encoder_cameras(cams)
    assert vec.shape == (4, 16)
    torch.testing.assert_close(vec[0], expected, atol=1e-6, rtol=0)


def test_radius_override_moves_cameras_along_their_view_lines(cams) -> None:
    moved = placed_c2w(cams, 4.0)
    assert torch.allclose(moved[:, :3, 3].norm(dim=-1), torch.full((4,), 4.0))
    assert torch.equal(moved[:, :3, :3], cams.c2w[:, :3, :3].float())
    assert torch.allclose(encoder_cameras(cams, 4.0)[:, 12:], encoder_cameras(cams)[:, 12:])


def test_render_rays_agree_with_cameras_project(cams) -> None:
    size = 20
    origins, dirs = camera_rays(cams.c2w, cams.intrinsics_normalized(), size)
    _, ref_dirs = cams.rays(size)
    torch.testing.assert_close(dirs, ref_dirs.reshape(4, -1, 3), atol=1e-6, rtol=0)
    points = origins + 2.3 * dirs  # one point on every pixel's ray
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    for k in range(4):
        uv, depth = cams.project(points[k], size)  # into every camera; camera k must see its own pixel centres
        torch.testing.assert_close(uv[k], torch.stack([u, v], -1).reshape(-1, 2), atol=1e-3, rtol=0)
        assert (depth[k] > 0).all()


# -- rendering -------------------------------------------------------------------------------------------------------
def test_renderer_draws_an_analytic_ball_with_the_right_silhouette_on_white(cams) -> None:
    radius, size = 0.6, 64

    def ball(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = points.norm(dim=-1)
        raw = torch.where(r < radius, 200.0, -30.0)  # density softplus(raw - 1): ~199 inside, ~1e-14 outside
        return raw, torch.tensor([0.8, 0.2, 0.1]).expand(*r.shape, 3)

    rgb, opacity = render_field(
        ball, 1, cams.c2w, cams.intrinsics_normalized(), size, box=1.0, samples_per_ray=64, chunk_rays=997
    )
    assert rgb.shape == (1, 4, 3, size, size) and opacity.shape == (1, 4, 1, size, size)
    # A sphere at distance d subtends asin(R / d); its silhouette radius in pixels is f * tan(asin(R / d)).
    expected = cams.focal_px(size) * math.tan(math.asin(radius / 2.7))
    area = (opacity[0, :, 0] > 0.5).sum(dim=(-1, -2)).float()
    assert torch.allclose(torch.sqrt(area / math.pi), torch.full((4,), expected), atol=0.25)
    background = opacity[0, :, 0] < 1e-6
    assert background.sum() > 0.5 * 4 * size * size
    assert torch.all(rgb[0].permute(1, 0, 2, 3)[:, background] >= 1.0 - 1e-6)  # exactly white where nothing is
    centre = rgb[0, :, :, size // 2, size // 2]
    torch.testing.assert_close(centre, torch.tensor([0.8, 0.2, 0.1]).expand(4, 3), atol=2e-3, rtol=0)


def test_rendering_is_deterministic_and_chunk_independent(tiny_model, cams) -> None:
    planes = torch.randn(2, 3, TINY.triplane_channels, TINY.plane_size, TINY.plane_size)
    c2w, intr = cams.c2w, cams.intrinsics_normalized()
    a, _ = tiny_model.render(planes, c2w, intr, 16, chunk_rays=1 << 14)
    b, _ = tiny_model.render(planes, c2w, intr, 16, chunk_rays=1 << 14)
    c, _ = tiny_model.render(planes, c2w, intr, 16, chunk_rays=101)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)


def test_batch_equals_single_calls(tiny_model, views, cams) -> None:
    rec = LRMReconstructor(tiny_model, digest="0" * 64)
    together = rec.render(rec.reconstruct(views, cams), cams, 24)
    alone = torch.cat([rec.render(rec.reconstruct(views[i : i + 1], cams), cams, 24) for i in range(len(views))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert together.min() >= 0 and together.max() <= 1


def test_bf16_autocast_runs_and_stays_close(tiny_model, views, cams) -> None:
    fp32 = LRMReconstructor(tiny_model, digest="0" * 64)
    bf16 = LRMReconstructor(tiny_model, digest="0" * 64, options=LRMOptions(dtype="bf16"))
    a = fp32.render(fp32.reconstruct(views[:1], cams), cams, 16)
    b = bf16.render(bf16.reconstruct(views[:1], cams), cams, 16)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.1


def test_mismatched_views_and_cameras_are_refused(tiny_model, cams) -> None:
    with pytest.raises(ConfigError, match="do not match 4 cameras"):
        LRMReconstructor(tiny_model, digest="0" * 64).reconstruct(torch.ones(1, 3, 3, 16, 16), cams)


# -- the metric ------------------------------------------------------------------------------------------------------
def test_metric_without_weights_says_how_to_get_them(tmp_path) -> None:
    with pytest.raises(WeightsMissingError, match=r"mrc weights fetch --lrm instant-nerf-large") as info:
        MRC(MetricSettings(reconstructor="lrm", distance="lpips-alex", lrm_cache_dir=tmp_path))
    assert "MRC_LRM_CHECKPOINT" in str(info.value) and "Apache-2.0" in str(info.value)
    with pytest.raises(WeightsMissingError, match="does not exist"):
        MRC(MetricSettings(reconstructor="lrm", lrm_checkpoint=tmp_path / "nope.ckpt"))
    with pytest.raises(WeightsMissingError, match="no published weights"):
        MRC(MetricSettings(reconstructor="lrm", lrm_preset="tiny"))


def test_metric_scores_with_a_local_checkpoint(tiny_ckpt, views) -> None:
    settings = MetricSettings(reconstructor="lrm", lrm_preset="tiny", lrm_checkpoint=tiny_ckpt, view_size=32)
    metric = MRC(settings)
    assert metric.metric_id.endswith("/lrm-" + file_sha256(tiny_ckpt)[:8])
    first, second = metric.score_views(views[:2]), metric.score_views(views[:2])
    assert first.mrc.shape == (2,) and torch.isfinite(first.mrc).all()
    assert torch.equal(first.mrc, second.mrc)


def test_lrm_settings_enter_only_the_lrm_metric_id() -> None:
    carve = MetricSettings()
    assert carve.settings_hash() == carve.model_copy(update={"lrm_samples_per_ray": 64}).settings_hash()
    lrm = MetricSettings(reconstructor="lrm")
    assert lrm.settings_hash() != lrm.model_copy(update={"lrm_samples_per_ray": 64}).settings_hash()
    assert lrm.settings_hash() == lrm.model_copy(update={"lrm_chunk_rays": 128}).settings_hash()


# -- fetching --------------------------------------------------------------------------------------------------------
@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_fetch_offline_is_a_one_line_error_naming_the_command(hub_cache, monkeypatch, capsys) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from carve3d_reward.cli import main

    def offline(*_args: object, **_kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot reach the Hub\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert main(["weights", "fetch", "--lrm", "instant-nerf-large"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach the Hub" in err and "MRC_LRM_CHECKPOINT" in err


def test_fetch_verifies_what_it_downloaded(hub_cache, tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    from carve3d_reward.cli import main

    blob = tmp_path / "instant_nerf_large.ckpt"
    blob.write_bytes(b"not the published file")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(blob))
    with pytest.raises(WeightsMismatchError, match="does not match"):
        fetch_checkpoint("instant-nerf-large")
    pinned = replace(
        PRESETS["instant-nerf-large"], hub=HubFile("TencentARC/InstantMesh", blob.name, file_sha256(blob), 22)
    )
    monkeypatch.setitem(PRESETS, "instant-nerf-large", pinned)
    assert main(["weights", "fetch", "--lrm", "instant-nerf-large"]) == 0
    assert str(blob) in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no published weights"):
        fetch_checkpoint("tiny")
