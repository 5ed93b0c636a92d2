"""A small pixel-space multi-view diffusion model that trains and samples on a CPU.

The same diffusers ``UNet2DConditionModel`` as Stable Diffusion (so LoRA
targets, cross-attention and the whole RL code path are identical), shrunk,
denoising a 2x2 grid of views directly in pixel space, conditioned on a
hashed bag-of-words prompt encoder (the words through cross-attention, their
mean through the timestep embedding). Built from a config; weights are random
or loaded from a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..ddim import DDIMSchedule
from ..prompts import BUILTIN_PREFIX
from .base import Conditioning, DiffusionPolicy, SamplingConfig

_WORD = re.compile(r"[a-z0-9]+")
#: The shipped weights (``builtin:<name>``): see ``weights/<name>/README.md`` for how each was made.
SHIPPED = ("tiny-sft",)


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny policy (everything needed to rebuild it)."""

    image_size: int = 64  # the grid's side: 2x2 views of image_size / 2 pixels
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: int = 1  # the deepest levels get cross-attention (cheap at low resolution)
    layers_per_block: int = 1
    text_dim: int = 32
    vocab_buckets: int = 1024  # words are hashed into this many embeddings
    max_words: int = 12
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    # v = sqrt(a) eps - sqrt(1 - a) x0: an epsilon-predicting pixel model gets the global brightness of the
    # white-background grids wrong at high noise (its error is divided by sqrt(a) ~ 0.01) and samples darken.
    prediction_type: str = "v_prediction"
    # The prompt's mean word embedding, projected, is added to the timestep embedding of every ResNet block
    # (diffusers' ``class_embed_type="projection"``, as SDXL adds its pooled text embedding): colour is a
    # global attribute, which cross-attention at the deepest level alone learnt slowly (the model drew the
    # named colours a third of the time after 1000 steps).
    pooled_text: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TinyConfig:
        raw = json.loads(text)
        raw["block_out_channels"] = tuple(raw["block_out_channels"])
        raw["sampling"] = SamplingConfig(**raw["sampling"])
        raw.setdefault("prediction_type", "epsilon")  # files written before the fields existed
        raw.setdefault("pooled_text", False)
        return TinyConfig(**raw)


class HashedTextEncoder(nn.Module):
    """Prompt -> ``[B, max_words, dim]``: hashed word embeddings plus positions (empty prompt = padding)."""

    def __init__(self, buckets: int, max_words: int, dim: int) -> None:
        super().__init__()
        self.buckets, self.max_words = buckets, max_words
        self.words = nn.Embedding(buckets + 1, dim, padding_idx=buckets)  # the last row is padding
        self.positions = nn.Parameter(torch.zeros(max_words, dim))
        nn.init.normal_(self.positions, std=0.02)

    def token_ids(self, prompts: list[str]) -> Tensor:
        ids = torch.full((len(prompts), self.max_words), self.buckets, dtype=torch.int64)
        for i, prompt in enumerate(prompts):
            words = _WORD.findall(prompt.lower())[: self.max_words]
            for j, w in enumerate(words):
                ids[i, j] = int.from_bytes(hashlib.blake2s(w.encode(), digest_size=4).digest(), "little") % self.buckets
        return ids

    def forward(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)[0]

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """The per-word states and ``[B, dim]``: the mean embedding of the prompt's words (zeros for ``""``)."""
        ids = self.token_ids(prompts).to(self.positions.device)
        mask = (ids != self.buckets).unsqueeze(-1).to(self.positions.dtype)
        words = self.words(ids)
        return words + self.positions * mask, (words * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def resolve_weights(spec: str | Path) -> Path:
    """A weights folder: ``builtin:<name>`` (shipped with the package, see :data:`SHIPPED`) or a path.

    A missing folder or file is a :class:`~carve3d_reward.errors.ConfigError` naming what is there.
    """
    from importlib import resources

    from carve3d_reward.errors import ConfigError

    text = str(spec)
    if text.startswith(BUILTIN_PREFIX):
        name = text.removeprefix(BUILTIN_PREFIX)
        if name not in SHIPPED:
            shipped = ", ".join(BUILTIN_PREFIX + n for n in SHIPPED)
            raise ConfigError(f"{text}: no such shipped model (shipped: {shipped})")
        path = Path(str(resources.files("carve3d_trainer") / "weights" / name))
    else:
        path = Path(text)
    missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise ConfigError(
            f"{text}: not a tiny-model weights folder (missing {', '.join(missing)}); make one with "
            "`carve3d-train sft --out FOLDER` or use builtin:tiny-sft"
        )
    return path


class TinyGridPolicy(DiffusionPolicy):
    """The CPU model: pixel-space 2x2 grids in ``[-1, 1]``."""

    def __init__(self, config: TinyConfig | None = None) -> None:
        from diffusers import UNet2DConditionModel

        config = config or TinyConfig()
        n = len(config.block_out_channels)
        plain = n - config.attention_levels
        unet = UNet2DConditionModel(
            sample_size=config.image_size,
            in_channels=3,
            out_channels=3,
            block_out_channels=config.block_out_channels,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * config.attention_levels,
            up_block_types=("CrossAttnUpBlock2D",) * config.attention_levels + ("UpBlock2D",) * plain,
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.text_dim,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups,
            class_embed_type="projection" if config.pooled_text else None,
            projection_class_embeddings_input_dim=config.text_dim if config.pooled_text else None,
        )
        alphas = DDIMSchedule.linear_betas(config.num_train_timesteps)
        super().__init__(unet, alphas, config.sampling, prediction_type=config.prediction_type)
        self.config = config
        self.text_encoder = HashedTextEncoder(config.vocab_buckets, config.max_words, config.text_dim)
        self.text_encoder.requires_grad_(False)

    def conditioning(self, prompts: list[str]) -> Conditioning:
        """The UNet's conditioning for ``prompts`` (``""``: the unconditional one)."""
        hidden, pooled = self.text_encoder.encode(prompts)  # the prompts are hashed once for both
        cond = {"encoder_hidden_states": hidden}
        if self.config.pooled_text:
            cond["class_labels"] = pooled
        return cond

    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, Conditioning]:
        return self.conditioning(prompts), self.conditioning([""] * len(prompts))

    def latent_shape(self) -> tuple[int, ...]:
        return (3, self.config.image_size, self.config.image_size)

    def decode(self, latents: Tensor) -> Tensor:
        return (latents + 1.0) / 2.0

    # -- weights ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: Path) -> None:
        """``config.json`` + ``model.safetensors`` (UNet and text encoder)."""
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(self.config.to_json())
        tensors = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"text.{k}": v for k, v in self.text_encoder.state_dict().items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: Path | str, sampling: SamplingConfig | None = None) -> TinyGridPolicy:
        """Weights saved by :meth:`save_pretrained` (a folder or ``builtin:<name>``), strictly loaded."""
        path = resolve_weights(path)
        config = TinyConfig.from_json((path / "config.json").read_text())
        if sampling is not None:
            config = TinyConfig(
                **{**asdict(config), "block_out_channels": config.block_out_channels, "sampling": sampling}
            )
        policy = cls(config)
        tensors = load_file(str(path / "model.safetensors"))
        policy.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        policy.text_encoder.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")})
        return policy
