"""SFT stage: prompt -> scene parsing, the rendered data, and diffusion training of the tiny model."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from carve3d_reward.tools.synthetic import BOX, CHECKER, CYLINDER, ELLIPSOID, STRIPES
from carve3d_trainer.cli import main
from carve3d_trainer.policies.base import SamplingConfig
from carve3d_trainer.policies.tiny import TinyConfig, TinyGridPolicy
from carve3d_trainer.prompts import load_prompts
from carve3d_trainer.sft import SAMPLE_PROMPTS, diffusion_loss, train_sft
from carve3d_trainer.sft_data import COLOURS, parse_prompt, random_prompt, scene_from_prompt, sft_batch

from .test_trainer import MICRO


def _close(colour: torch.Tensor, name: str) -> bool:
    """``colour`` is nearest to the palette colour ``name``."""
    dists = {k: float((colour - torch.tensor(v)).norm()) for k, v in COLOURS.items()}
    return min(dists, key=dists.__getitem__) == name


def test_one_object_prompt() -> None:
    for seed in range(3):
        scene = scene_from_prompt("a red sphere", seed)
        assert len(scene) == 1
        assert scene.active[0].tolist() == [True, False]
        assert int(scene.kind[0, 0]) == ELLIPSOID
        assert _close(scene.colour_a[0, 0], "red")
    striped = scene_from_prompt("a striped blue sphere", 0)
    assert int(striped.texture[0, 0]) == STRIPES and _close(striped.colour_a[0, 0], "blue")
    assert not _close(striped.colour_b[0, 0], "blue")  # a second, different colour
    assert int(scene_from_prompt("a checkered red cube", 0).texture[0, 0]) == CHECKER
    assert int(scene_from_prompt("a tall green cylinder", 0).kind[0, 0]) == CYLINDER


def test_two_object_prompts_are_placed_by_relation() -> None:
    scene = scene_from_prompt("a yellow cube next to a purple sphere", 5)
    assert scene.active[0].tolist() == [True, True]
    assert scene.kind[0].tolist() == [BOX, ELLIPSOID]
    assert _close(scene.colour_a[0, 0], "yellow") and _close(scene.colour_a[0, 1], "purple")
    left, right = scene.centres[0]
    assert right[0] - left[0] > 0.5  # side by side along x ...
    assert abs(float(right[1] - left[1])) < 1e-5  # ... not in depth

    stacked = scene_from_prompt("a yellow sphere on a blue cube", 5)
    top, bottom = stacked.centres[0]
    assert stacked.kind[0].tolist() == [ELLIPSOID, BOX]
    assert top[2] - bottom[2] > 0.5  # the sphere is above the cube
    assert float((top[:2] - bottom[:2]).norm()) < 0.1


def test_parsing_is_forgiving() -> None:
    assert parse_prompt("A Purple CYLINDER, please!").objects[0].colour == "purple"
    spec = parse_prompt("a green cube and a yellow cylinder")
    assert [o.shape for o in spec.objects] == ["cube", "cylinder"] and spec.relation == "and"
    # no recognised shape: one random (seeded) object, still a valid scene
    for prompt in ("", "a shiny thing"):
        scene = scene_from_prompt(prompt, 3)
        assert scene.active[0].tolist() == [True, False]
        assert torch.equal(scene.world_to_local, scene_from_prompt(prompt, 3).world_to_local)


def test_random_prompts_follow_the_grammar() -> None:
    rng = random.Random(0)
    prompts = [random_prompt(rng) for _ in range(200)]
    assert prompts == [random_prompt(r) for r in [random.Random(0)] for _ in range(200)]
    assert len(set(prompts)) > 100
    for p in prompts:
        spec = parse_prompt(p)
        assert all(o.shape and o.colour for o in spec.objects)
    assert {len(parse_prompt(p).objects) for p in prompts} == {1, 2}
    # every shipped prompt parses into fully specified objects
    for p in load_prompts("builtin:shapes-train") + load_prompts("builtin:shapes-test"):
        assert all(o.shape and o.colour for o in parse_prompt(p).objects), p


def test_sft_batch_is_deterministic_with_white_background_and_objects_in_every_view() -> None:
    prompts = ["a red sphere", "a yellow cube next to a purple sphere", "a flat orange box"]
    grids = sft_batch(prompts, seed=4, view_size=16)
    assert grids.shape == (3, 3, 32, 32)
    assert torch.equal(grids, sft_batch(prompts, seed=4, view_size=16))
    assert not torch.equal(grids, sft_batch(prompts, seed=5, view_size=16))
    assert grids.min() >= 0 and grids.max() <= 1
    views = grids.unfold(2, 16, 16).unfold(3, 16, 16)  # [B, 3, 2, 2, 16, 16]
    corners = views[..., 0, 0]
    assert torch.all(corners == 1.0)  # white background
    foreground = (views < 0.9).any(dim=1).flatten(3).float().mean(-1)  # [B, 2, 2]
    assert torch.all(foreground > 0.05)


def test_sft_reduces_the_loss_on_a_fixed_batch() -> None:
    prompts = ["a red sphere", "a blue cube", "a yellow cube next to a purple sphere", "a tall green cylinder"]
    x0 = sft_batch(prompts, 123, MICRO.image_size // 2) * 2 - 1
    timesteps = torch.tensor([50, 250, 500, 800])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    policy = TinyGridPolicy(MICRO)
    with torch.no_grad():
        before = float(diffusion_loss(policy, x0, prompts, timesteps, noise))
    losses = train_sft(policy, steps=12, batch_size=4, lr=3e-3, seed=1)
    with torch.no_grad():
        after = float(diffusion_loss(policy, x0, prompts, timesteps, noise))
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert after < 0.8 * before, (before, after)
    assert all(p.requires_grad for p in policy.text_encoder.parameters())  # trained alongside the UNet


def test_sft_is_deterministic_given_the_seed() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        policy = TinyGridPolicy(MICRO)
        train_sft(policy, steps=2, batch_size=2, lr=1e-3, seed=seed)
        return policy.state_dict()

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_cli_writes_weights_and_a_loss_curve(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sft"
    args = ["sft", "--out", str(out), "--steps", "2", "--batch-size", "2", "--seed", "0", "--image-size", "16"]
    assert main([*args, "--no-progress", "--prompts", "builtin:shapes-train"]) == 0
    assert "final loss" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "loss.png", "samples.png", "README.md"):
        assert (out / name).stat().st_size > 0
    with Image.open(out / "samples.png") as strip:  # one 16 px grid per held-out prompt, side by side
        assert strip.size == (16 * SAMPLE_PROMPTS, 16)
    card = (out / "README.md").read_text()
    assert "![samples](samples.png)" in card
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() in card
    assert "--steps 2 --batch-size 2 --seed 0 --image-size 16" in card and "--prompts builtin:shapes-train" in card
    policy = TinyGridPolicy.from_pretrained(out, sampling=SamplingConfig(num_steps=2, guidance_scale=3.0))
    traj = policy.sample(["a red sphere"], generator=torch.Generator().manual_seed(0), with_reference=False)
    assert traj.images.shape == (1, 3, 16, 16) and torch.isfinite(traj.images).all()


def test_pooled_prompt_embedding_reaches_the_unet_and_old_configs_load_without_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    policy = TinyGridPolicy(replace(MICRO, pooled_text=True))
    cond, uncond = policy.encode_prompts(["a red cube", "a blue sphere next to a green box"])
    assert cond["class_labels"].shape == (2, MICRO.text_dim)
    assert torch.equal(uncond["class_labels"], torch.zeros_like(uncond["class_labels"]))  # "" pools to nothing
    # the pooled vector alone changes the prediction: it is added to the timestep embedding
    x, t = torch.randn(2, 3, MICRO.image_size, MICRO.image_size), torch.tensor([500, 500])
    hidden = cond["encoder_hidden_states"]
    with torch.no_grad():
        a = policy.unet(x, t, encoder_hidden_states=hidden, class_labels=cond["class_labels"]).sample
        b = policy.unet(x, t, encoder_hidden_states=hidden, class_labels=uncond["class_labels"]).sample
    assert (a - b).abs().max() > 1e-3
    # weights saved before the option existed (no "pooled_text" in config.json) load as they were made
    policy.save_pretrained(tmp_path / "new")
    raw = json.loads((tmp_path / "new" / "config.json").read_text())
    assert raw["pooled_text"] is True
    del raw["pooled_text"]
    assert TinyConfig.from_json(json.dumps(raw)).pooled_text is False
    assert "class_labels" not in TinyGridPolicy(TinyConfig.from_json(json.dumps(raw))).encode_prompts(["a cube"])[0]
