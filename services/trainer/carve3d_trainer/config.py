"""The trainer's settings: one typed object (``CARVE3D_*`` env vars, a JSON config file, CLI overrides).

Defaults are the Carve3D paper's published settings where they apply (the
paper, Sec. 4) scaled down to the CPU demo where they cannot: the published
run is 768 samples per epoch at 100 DDIM steps on an SDXL model; the defaults
here finish in minutes on a laptop.

A config file is JSON in the shape :meth:`TrainConfig.to_json` writes (sections
as objects, any subset of the settings). ``--config NAME`` (no ``/`` and no
``.``, or ``builtin:NAME``) is a preset shipped with the package
(``carve3d_trainer/presets/NAME.json``; ``demo`` is the demo's, also at
``configs/demo.json`` in the repository); anything else is a file's path.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from carve3d_reward.errors import ConfigError
from carve3d_reward.settings import MetricSettings


class PolicyConfig(BaseModel):
    """The diffusion model being finetuned and how it samples."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tiny", "sd", "sdxl"] = Field("tiny", description="Model family.")
    path: str | None = Field(
        None, description="Weights: a local folder or hub id (tiny: also builtin:<name>; unset: random init)."
    )
    num_steps: int = Field(20, ge=2, le=1000, description="DDIM steps per sample.")
    guidance_scale: float = Field(5.0, ge=1.0, description="Classifier-free guidance.")
    eta: float = Field(1.0, gt=0.0, le=1.0, description="DDIM eta (1: a proper stochastic policy).")
    lora_rank: int = Field(4, ge=0, description="LoRA rank on the UNet attention; 0 = full finetune.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet modules that get LoRA adapters (a JSON list).",
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="UNet precision (log-probs stay fp32).")


class AlgorithmConfig(BaseModel):
    """The policy gradient: advantages, the loss, the optimiser and when to stop."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["reinforce", "ppo"] = Field("reinforce", description="DDPO-SF (paper) or DDPO-IS with PPO clip.")
    alpha: float = Field(1.0, description="Weight of the reward advantage.")
    beta: float = Field(0.2, ge=0.0, description="Weight of the normalised KL advantage.")
    kl_budget: float | None = Field(
        None,
        gt=0.0,
        description="None (the paper): the KL advantage is normalised per prompt like the reward's, so it has "
        "unit spread however small the KL and pulls toward the reference as hard at KL 1e-4 as at 1e-2. "
        "A number: weight it by sqrt(round's mean KL / kl_budget), at most 1, so that the pull grows with "
        "the distance from the reference, as a KL penalty's does, and is the paper's from the budget on.",
    )
    adv_clip: float = Field(5.0, gt=0.0, description="Advantages are clipped to +-adv_clip.")
    ppo_clip: float = Field(1e-4, gt=0.0, description="PPO ratio clip range (method ppo).")
    ppo_epochs: int = Field(1, ge=1, description="Optimisation passes per sampling round (method ppo).")
    timestep_fraction: float = Field(1.0, gt=0.0, le=1.0, description="Fraction of steps trained per sample.")
    min_step_sigma: float = Field(
        0.0,
        ge=0.0,
        description="Train and measure the KL on only the steps whose DDIM sigma is at least this (0: all); "
        "the nearly deterministic last steps below it act as a fixed decoder. A step's log-prob gradient and "
        "log-ratio scale as 1/sigma^2: in pixel space the last steps (sigma ~0.01) would dominate both with "
        "pixel noise.",
    )
    train_batch_size: int = Field(4, ge=1, description="Samples per backward pass.")
    grad_accum: int = Field(0, ge=0, description="Backward passes per optimiser step (0: the whole round).")
    lr: float = Field(3e-4, gt=0.0, description="AdamW's learning rate.")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW's weight decay.")
    adam_beta2: float = Field(
        0.999,
        gt=0.0,
        lt=1.0,
        description="AdamW's second-moment decay. Lower (0.99) follows gradients that grow during the run "
        "(LoRA's do as the adapters leave zero) instead of averaging them with the small early ones.",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradients are clipped to this norm before each step.")
    tracker_buffer: int = Field(3, ge=1, description="Tracker ring buffer, in samples per prompt per epoch.")
    tracker_min_count: int = Field(1, ge=1, description="Below this (x samples per prompt), batch statistics.")
    warmup_epochs: int = Field(1, ge=0, description="Epochs that only fill the trackers (no update).")
    kl_stop: float | None = Field(
        None, gt=0.0, description="Stop when a round's mean KL passes this (that round updates nothing)."
    )


class RewardConfig(BaseModel):
    """Where the MRC reward comes from."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["service", "in-process"] = Field("service", description="Score through the service or locally.")
    url: str = Field(
        default_factory=lambda: os.environ.get("MRC_URL", "http://127.0.0.1:8080"),
        description="Reward service URL (mode service); default $MRC_URL, else http://127.0.0.1:8080.",
    )
    token: SecretStr | None = Field(
        default_factory=lambda: SecretStr(t) if (t := os.environ.get("MRC_AUTH_TOKEN")) else None,
        description="Bearer token of the service; default $MRC_AUTH_TOKEN.",
    )
    timeout_s: float = Field(120.0, gt=0.0, description="Per-attempt timeout.")
    deadline_s: float = Field(900.0, gt=0.0, description="Give up on a batch after this long (then the run stops).")
    retries: int = Field(10, ge=0, description="Retries of a batch after connection errors, 502, 503 and 504.")
    metric: MetricSettings = Field(
        default_factory=MetricSettings,
        description="The MRC metric of mode in-process (its defaults follow the MRC_* env vars).",
    )


class TargetsConfig(BaseModel):
    """What ``report.md`` checks the run against, from its own numbers (none by default)."""

    model_config = ConfigDict(extra="forbid")

    min_mrc_drop: float | None = Field(
        None, gt=0.0, lt=1.0, description="Held-out MRC falls by at least this fraction of the base model's."
    )
    max_alignment_drop: float | None = Field(
        None, ge=0.0, description="Held-out prompt alignment falls by at most this many percentage points."
    )
    kl_under_stop: bool = Field(False, description="The last round's KL stays under algorithm.kl_stop (if set).")


class TrainConfig(BaseSettings):
    """Everything a run needs (``CARVE3D_*``; nested with ``__``, e.g. ``CARVE3D_REWARD__URL``)."""

    model_config = SettingsConfigDict(env_prefix="CARVE3D_", env_nested_delimiter="__", extra="forbid")

    run_dir: Path = Field(Path("out/train"), description="Checkpoints, logs, samples and the report.")
    seed: int = Field(0, description="Seeds the prompts, the sampling noise and the minibatch order of every round.")
    epochs: int = Field(10, ge=1, description="Sampling rounds (including warm-up).")
    train_prompts: str = Field("builtin:shapes-train", description="A prompt file, or builtin:<name>.")
    test_prompts: str = Field("builtin:shapes-test", description="Held-out prompts for evaluation.")
    samples_per_epoch: int = Field(32, ge=1, description="Samples per round (all processes together).")
    sample_batch_size: int = Field(8, ge=1, description="Samples per sampling call (per process).")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="1: every sample draws its prompt independently (DDPO). k > 1: each round samples "
        "samples_per_epoch / k prompts (in turn, from a shuffled prompt set) k times each, so every prompt's "
        "advantage is normalised against samples of the same round (the paper: 768 samples over 30 prompts).",
    )
    eval_every: int = Field(
        1, ge=0, description="Evaluate every N epochs (0: only the last); the base model before round 0 always."
    )
    eval_samples_per_prompt: int = Field(1, ge=1, description="Held-out samples per prompt (>= 2: diversity).")
    save_every: int = Field(1, ge=1, description="Checkpoint every N epochs.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.samples_per_epoch % self.sample_batch_size:
            raise ValueError(
                f"samples_per_epoch ({self.samples_per_epoch}) must be a multiple of "
                f"sample_batch_size ({self.sample_batch_size})"
            )
        if self.samples_per_epoch % self.samples_per_prompt:
            raise ValueError(
                f"samples_per_epoch ({self.samples_per_epoch}) must be a multiple of "
                f"samples_per_prompt ({self.samples_per_prompt})"
            )
        return self

    def to_json(self, *, token: Literal["mask", "omit"] = "mask") -> str:
        """Every setting as JSON. A set token is written as ``***`` (``mask``: the run folder's record) or left
        out (``omit``: read back with ``--config``, the output is this config again, the token coming from
        ``$MRC_AUTH_TOKEN`` again)."""
        data = self.model_dump(mode="json")
        if data["reward"]["token"]:
            if token == "omit":
                del data["reward"]["token"]
            else:
                data["reward"]["token"] = "***"
        return json.dumps(data, indent=2, sort_keys=True)


PRESET_PREFIX = "builtin:"


def presets() -> list[str]:
    """The names of the config presets shipped with the package."""
    folder = resources.files("carve3d_trainer") / "presets"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def config_file(spec: str | Path) -> Path:
    """``--config``'s file: ``NAME`` or ``builtin:NAME`` (no ``/``, no ``.``) is a shipped preset, else a path."""
    text = str(spec)
    name = text.removeprefix(PRESET_PREFIX)
    if text.startswith(PRESET_PREFIX) or not any(c in name for c in "/\\."):
        resource = resources.files("carve3d_trainer") / "presets" / f"{name}.json"
        if not resource.is_file():
            raise ConfigError(
                f"--config {text}: no such preset (shipped: {', '.join(presets())}); "
                "a file's path has a / or a suffix, e.g. ./my-config.json"
            )
        return Path(str(resource))
    return Path(text)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < env vars < config file < overrides (dotted keys, e.g. ``{"algorithm.beta": 0}``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = value
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise ConfigError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None
