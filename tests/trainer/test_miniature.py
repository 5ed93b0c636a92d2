"""The miniature Carve3D: the shipped SFT model and one RL epoch of the demo against a live service."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from carve3d_reward.errors import ConfigError
from carve3d_trainer.cli import main
from carve3d_trainer.config import config_file, load_config
from carve3d_trainer.demo import DEMO_PRESET, demo_config, run_demo
from carve3d_trainer.policies import build_policy
from carve3d_trainer.policies.base import SamplingConfig
from carve3d_trainer.policies.tiny import TinyGridPolicy, resolve_weights
from carve3d_trainer.quality import aligned
from carve3d_trainer.run_layout import BASE_EPOCH
from carve3d_trainer.sft_data import COLOURS

SHIPPED = "builtin:tiny-sft"


def test_shipped_sft_model_loads_strictly_and_matches_its_card() -> None:
    folder = resolve_weights(SHIPPED)
    card = (folder / "README.md").read_text()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest in card  # the card names the file it describes
    policy = TinyGridPolicy.from_pretrained(SHIPPED)
    # every tensor of the file is one of the model's and vice versa, and the model is not at its random init
    keys = set(load_file(str(folder / "model.safetensors")))
    expected = {f"unet.{k}" for k in policy.unet.state_dict()} | {f"text.{k}" for k in policy.text_encoder.state_dict()}
    assert keys == expected
    torch.manual_seed(0)
    fresh = TinyGridPolicy(policy.config)
    moved = [not torch.equal(a, b) for a, b in zip(policy.unet.parameters(), fresh.unet.parameters(), strict=True)]
    assert all(moved)


@pytest.mark.slow
def test_shipped_model_samples_deterministically_and_follows_the_prompt() -> None:
    demo = load_config(config_file(DEMO_PRESET)).policy
    sampling = SamplingConfig(num_steps=demo.num_steps, guidance_scale=demo.guidance_scale, eta=demo.eta)
    policy = TinyGridPolicy.from_pretrained(SHIPPED, sampling=sampling)
    prompts = [f"a {c} {s}" for c in COLOURS for s in ("sphere", "cube", "cylinder")]

    def draw(seed: int, n: int = len(prompts)) -> torch.Tensor:
        with torch.no_grad():
            return policy.sample(
                prompts[:n], generator=torch.Generator().manual_seed(seed), with_reference=False
            ).images

    first, again, other = draw(7, 4), draw(7, 4), draw(8, 4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    first = draw(7)
    # stopped early, it still draws most prompts' colours, and far more often than other prompts' colours
    rotated = prompts[3:] + prompts[:3]
    assert aligned(first, prompts).float().mean() >= 0.5
    assert aligned(first, prompts).float().mean() >= aligned(first, rotated).float().mean() + 0.4


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="builtin:tiny-sft"):
        resolve_weights(tmp_path)
    with pytest.raises(ConfigError, match="no such shipped model"):
        resolve_weights("builtin:nope")
    config = load_config(None, {"policy.path": str(tmp_path), "run_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"missing config\.json"):
        build_policy(config.policy)


@pytest.mark.slow
def test_one_rl_epoch_of_the_demo_against_a_live_service(tmp_path: Path, capsys) -> None:
    """The base model's evaluation, then two rounds that update, over HTTP, with the report and its comparison."""
    overrides = {
        "epochs": 2,
        "samples_per_epoch": 8,
        "sample_batch_size": 8,
        "algorithm.train_batch_size": 8,
        "eval_samples_per_prompt": 2,
        "policy.num_steps": 4,
    }
    report = run_demo(tmp_path, overrides=overrides, progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())  # the demo ran the preset (see test_config_cli.py)
    assert saved == json.loads(demo_config(run, saved["reward"]["url"], overrides).to_json())
    base, *rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert base["epoch"] == BASE_EPOCH and base["eval_before_update"]
    assert base["eval_kl"] == 0.0  # the base is the reference
    assert [h["epoch"] for h in rounds] == [0, 1]
    assert [h["updated"] for h in rounds] == [True, True]  # the demo has no warm-up round
    assert [h["optimizer_steps"] for h in rounds] == [1, 1]
    assert all(h["invalid"] < 8 for h in rounds) and base["eval_invalid"] + rounds[1]["eval_invalid"] < 12  # scored
    for h in (base, rounds[1]):
        assert 0.0 <= h["eval_alignment"] <= 100.0 and h["eval_diversity"] > 0.0
        assert 0.0 < h["eval_mrc_se"] < h["eval_mrc"]
    text = report.read_text()
    assert "Base model (before any update) vs finetuned (epoch 1)" in text
    assert (run / "eval" / "base.png").exists() and (run / "eval" / "epoch-0001.png").exists()
    assert (run / "compare.png").exists() and "compare.png" in text
    out = capsys.readouterr().out
    assert "held-out MRC" in out and ("PASS" in out or "FAIL" in out)
    # the ablation figure of docs/experiments.md is made from run folders like this one
    figure = tmp_path / "runs.png"
    assert main(["compare", f"demo={run}", f"again={run}", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
    assert "demo: held-out MRC" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_stops_the_demo_and_its_service(tmp_path: Path) -> None:
    """No orphaned reward service when a scheduler or a user terminates the demo."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "carve3d_trainer.cli", "demo", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # the first line: the service is ready
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        serving = True
        while serving and time.monotonic() < deadline:
            out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            serving = f"--port {port.group(1)} " in out
            time.sleep(0.5)
        assert not serving, "the reward service outlived the demo"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
