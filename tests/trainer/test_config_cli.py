"""Settings as files and flags: the demo's preset is configs/demo.json, ``train --help`` lists every setting
with its default, and ``carve3d-train config`` prints JSON that ``--config`` reads back."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

import carve3d_trainer.trainer as trainer_module
from carve3d_reward.errors import ConfigError
from carve3d_trainer.cli import main
from carve3d_trainer.config import TargetsConfig, TrainConfig, config_file, load_config
from carve3d_trainer.demo import DEMO_PRESET, demo_config
from carve3d_trainer.reporting import check_targets

ROOT = Path(__file__).resolve().parents[2]
DEMO_FILE = ROOT / "configs" / "demo.json"
URL = "http://127.0.0.1:8123"


def setting_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every field of the config classes, as a dotted key (sections expanded)."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from setting_keys(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name


def printed_config(capsys, *argv: str) -> str:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out


def test_the_shipped_demo_preset_is_configs_demo_json() -> None:
    """One rule: a bare name (or builtin:NAME) is a shipped preset, anything with a / or a . a path."""
    assert config_file(DEMO_PRESET).read_bytes() == DEMO_FILE.read_bytes()
    assert config_file("builtin:demo") == config_file("demo")
    assert config_file("configs/demo.json") == Path("configs/demo.json")
    with pytest.raises(ConfigError, match=r"no such preset \(shipped: demo\)"):
        config_file("nope")


def test_train_with_configs_demo_json_runs_the_demos_config(tmp_path: Path, monkeypatch) -> None:
    """``carve3d-train train --config configs/demo.json`` against the demo's service is the demo's run."""
    run_dir = tmp_path / "run"
    seen: dict[str, TrainConfig] = {}

    class Started(Exception):
        pass

    class Capture:
        def __init__(self, config: TrainConfig, **_: object) -> None:
            seen["config"] = config
            raise Started

    monkeypatch.setattr(trainer_module, "Trainer", Capture)
    with pytest.raises(Started):
        main(["train", "--config", str(DEMO_FILE), "--run-dir", str(run_dir), "--reward-url", URL])
    demo = demo_config(run_dir, URL)
    assert seen["config"].model_dump() == demo.model_dump()
    assert demo.targets.min_mrc_drop == 0.2 and demo.algorithm.kl_stop == 0.01  # the preset, not the defaults


def test_config_prints_the_demos_config(tmp_path: Path, capsys) -> None:
    run_dir = str(tmp_path / "run")
    printed = printed_config(capsys, "--config", "demo", "--run-dir", run_dir, "--reward-url", URL)
    assert json.loads(printed) == json.loads(demo_config(Path(run_dir), URL).to_json())


def test_train_help_lists_every_setting_with_its_default(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    # one block per option: its flags, metavar and help (wrapped lines joined)
    blocks = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", text) if b.startswith("  --")]
    by_flag = {b.split()[0].rstrip(","): b for b in blocks}
    keys = list(setting_keys(TrainConfig))
    assert {"algorithm.beta", "algorithm.kl_budget", "policy.lora_rank", "reward.metric.view_size"} <= set(keys)
    for key in keys:
        flag = "--" + key.replace("_", "-")
        assert flag in by_flag, f"{key} is not in train --help"
        assert "(default: " in by_flag[flag], f"{flag} does not show its default"
    assert by_flag["--algorithm.beta"].endswith("(default: 0.2)")
    assert by_flag["--algorithm.kl-budget"].endswith("(default: null)")
    assert by_flag["--policy.lora-rank"].endswith("(default: 4)")
    assert by_flag["--policy.lora-targets"].endswith('(default: ["to_q", "to_k", "to_v", "to_out.0"])')
    assert by_flag["--reward.metric.view-size"].endswith("(default: 128)")
    assert by_flag["--run-dir"].endswith("(default: out/train)")
    # the older spellings still work, as aliases of their settings
    assert by_flag["--reward.url"].startswith("--reward.url TEXT, --reward-url TEXT")
    assert by_flag["--policy.path"].startswith("--policy.path TEXT|null, --policy-path TEXT|null")


def test_config_output_reads_back_through_config(tmp_path: Path, capsys, monkeypatch) -> None:
    """Every kind of setting, from every source; a token from the environment is not printed, and comes back."""
    monkeypatch.setenv("MRC_AUTH_TOKEN", "s3cret")
    first = printed_config(
        capsys,
        *("--config", "demo", "--set", "algorithm.beta=0.1", "--set", "train_prompts=builtin:objects-train"),
        *("--algorithm.lr", "0.001", "--algorithm.kl-budget", "null", "--run-dir", str(tmp_path / "r")),
        *("--reward.metric.view-size", "32", "--policy.lora-targets", '["to_q", "to_v"]'),
        *("--targets.kl-under-stop", "false", "--seed", "3"),
    )
    data = json.loads(first)
    assert "s3cret" not in first and "token" not in data["reward"]
    assert data["algorithm"]["beta"] == 0.1 and data["algorithm"]["lr"] == 0.001
    assert data["algorithm"]["kl_budget"] is None and data["reward"]["metric"]["view_size"] == 32
    assert data["policy"]["lora_targets"] == ["to_q", "to_v"] and data["policy"]["path"] == "builtin:tiny-sft"
    assert data["targets"]["kl_under_stop"] is False and data["seed"] == 3
    assert data["train_prompts"] == "builtin:objects-train" and data["run_dir"] == str(tmp_path / "r")
    saved = tmp_path / "printed.json"
    saved.write_text(first)
    assert printed_config(capsys, "--config", str(saved)) == first
    again = load_config(saved)
    assert again.reward.token is not None and again.reward.token.get_secret_value() == "s3cret"
    assert again.model_dump() == load_config(None, json.loads(first)).model_dump()


def test_a_flag_wins_over_set_and_set_over_the_file(capsys) -> None:
    data = json.loads(printed_config(capsys, "--config", "demo", "--set", "epochs=3", "--set", "seed=5", "--seed", "7"))
    assert (data["epochs"], data["seed"]) == (3, 7)
    text = json.loads(printed_config(capsys, "--set", "test_prompts=123", "--policy.path", "null"))
    assert text["test_prompts"] == "123" and text["policy"]["path"] is None  # text stays text; null is none


def test_the_report_checks_only_the_targets_the_config_sets() -> None:
    summary = {"mrc_change": -0.25, "alignment_change": -6.0, "train_kl": 0.004}
    assert check_targets(summary, TargetsConfig(), kl_stop=0.01) == {}  # the default: no targets
    demo = load_config(config_file(DEMO_PRESET))
    assert check_targets(summary, demo.targets, demo.algorithm.kl_stop) == {
        "held-out MRC falls by >= 20%": True,
        "alignment drops by <= 5 points": False,
        "KL stays under kl_stop = 0.01": True,
    }
    assert "KL stays under kl_stop = 0.01" not in check_targets(summary, demo.targets, kl_stop=None)
