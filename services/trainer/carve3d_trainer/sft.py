"""Supervised ("SFT") training of the tiny policy on procedural prompt -> 2x2 grid data.

Standard diffusion training: a grid ``x0`` in ``[-1, 1]`` of the scene a
prompt describes (:mod:`.sft_data`), a random timestep ``t``, noise ``eps`` and
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``; the loss is the MSE between the
UNet's prediction and its target: ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` for
the tiny model's default ``v_prediction`` (``eps`` for ``epsilon``). A fraction of the prompts (10% by
default) is replaced by ``""`` so the model also learns the unconditional
prediction that classifier-free guidance needs. The UNet and the hashed text
encoder are both trained (the RL stage later freezes the encoder again).
Deterministic given the seed (same weights for the same seed, steps and batch).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .policies.base import SamplingConfig, unet_kwargs
from .policies.tiny import TinyGridPolicy
from .rewards import to_uint8_grids
from .sft_data import item_seed, random_prompt, sft_batch

#: How many held-out prompts the model card's sample strip shows.
SAMPLE_PROMPTS = 8


def diffusion_loss(
    policy: TinyGridPolicy, x0: Tensor, prompts: Sequence[str], timesteps: Tensor, noise: Tensor
) -> Tensor:
    """Mean MSE of ``policy``'s prediction (noise, v or x0: its ``prediction_type``) on grids ``x0`` in ``[-1, 1]``."""
    device = policy.device
    x0, noise, timesteps = x0.to(device), noise.to(device), timesteps.to(device)
    a = policy.alphas_cumprod.to(device)[timesteps].to(torch.float32).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
    cond = unet_kwargs(policy.conditioning(list(prompts)))
    pred = policy.unet(x_t.to(policy.unet_dtype), timesteps, **cond).sample
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1.0 - a).sqrt() * x0, "sample": x0}
    return F.mse_loss(pred.to(torch.float32), target[policy.prediction_type])


def make_prompts(rng: random.Random, n: int, source: Sequence[str] | None, random_fraction: float) -> list[str]:
    """``n`` prompts: from ``source`` or (a ``random_fraction`` of them, all without a source) the grammar."""
    out = []
    for _ in range(n):
        if not source or rng.random() < random_fraction:
            out.append(random_prompt(rng))
        else:
            out.append(rng.choice(list(source)))
    return out


def train_sft(
    policy: TinyGridPolicy,
    *,
    steps: int,
    batch_size: int,
    lr: float = 5e-4,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    random_fraction: float = 0.5,
    prompt_dropout: float = 0.1,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``policy`` (UNet and text encoder) for ``steps`` AdamW steps; returns the per-step losses.

    ``prompts``: the prompt source. ``None`` draws every prompt from the grammar
    (:func:`.sft_data.random_prompt`); a list is mixed with grammar prompts
    (``random_fraction`` of them), so held-out combinations are still covered.
    With ``checkpoint_dir`` and ``checkpoint_every > 0`` the weights are saved
    there (``save_pretrained``) every ``checkpoint_every`` steps and at the end.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    policy.unet.requires_grad_(True)
    policy.text_encoder.requires_grad_(True)  # the encoder is learnt in SFT (frozen again for RL)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_train = policy.alphas_cumprod.shape[0]
    view = policy.config.image_size // 2
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="sft", unit="step")
    for step in range(steps):
        batch = make_prompts(rng, batch_size, prompts, random_fraction)
        x0 = sft_batch(batch, item_seed(seed, step), view) * 2.0 - 1.0
        t = torch.randint(0, n_train, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = (torch.rand(batch_size, generator=gen) < prompt_dropout).tolist()
        conditioned = ["" if d else p for p, d in zip(batch, drop, strict=True)]
        loss = diffusion_loss(policy, x0, conditioned, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
        if checkpoint_dir is not None and checkpoint_every > 0 and (step + 1) % checkpoint_every == 0:
            policy.save_pretrained(checkpoint_dir)
    if bar is not None:
        bar.close()
    policy.eval()
    if checkpoint_dir is not None:
        policy.save_pretrained(checkpoint_dir)
    return losses


def plot_losses(losses: Sequence[float], path: Path) -> Path:
    """The loss curve (raw and a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(1, len(losses) + 1))
    ax.plot(xs, losses, lw=0.8, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        kernel = torch.ones(1, 1, window) / window
        smooth = F.conv1d(torch.tensor(list(losses), dtype=torch.float32).view(1, 1, -1), kernel).flatten()
        ax.plot(xs[window - 1 :], smooth.tolist(), lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE of the prediction")
    ax.set_yscale("log")
    ax.set_title("SFT loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_strip(policy: TinyGridPolicy, prompts: Sequence[str], path: Path, *, seed: int = 0) -> Path:
    """One sampled grid per prompt, side by side, as a PNG: what the weights draw, for the model card."""
    from PIL import Image

    with torch.no_grad():
        images = policy.sample(
            list(prompts), generator=torch.Generator().manual_seed(seed), with_reference=False
        ).images
    strip = torch.cat(list(to_uint8_grids(images)), dim=1)  # [H, n * W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip.numpy()).save(path)
    return path


def write_model_card(
    folder: Path, command: str, losses: Sequence[float], seconds: float, sampling: SamplingConfig | None = None
) -> Path:
    """``README.md`` beside the weights: how they were made and the SHA-256 of the file it describes."""
    import hashlib
    import json

    weights = folder / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    config = json.loads((folder / "config.json").read_text())
    tail = losses[-max(1, len(losses) // 10) :]
    text = (
        "# Tiny multi-view diffusion model (SFT stage of the miniature Carve3D)\n\n"
        "A pixel-space diffusers `UNet2DConditionModel` with a hashed bag-of-words prompt encoder "
        f"(`carve3d_trainer/policies/tiny.py`), {config['image_size']} px 2x2 grids, "
        f"`{config['prediction_type']}`, trained on procedural prompt -> grid data (`sft_data.py`).\n\n"
        f"Made by:\n\n```bash\n{command}\n```\n\n"
        f"- steps: {len(losses)}, final loss (mean of the last 10%): {sum(tail) / len(tail):.4f}\n"
        f"- wall time: {seconds / 60:.1f} min on torch {torch.__version__} with {torch.get_num_threads()} CPU "
        "threads (a bitwise reproduction needs the same: the thread count changes float reductions)\n"
        f"- `model.safetensors` SHA-256: `{digest}`\n"
        "- loss curve: `loss.png`\n"
    )
    if sampling is not None and (folder / "samples.png").is_file():
        text += (
            f"- samples (`samples.png`: {sampling.num_steps} DDIM steps, guidance {sampling.guidance_scale:g}, "
            f"seed 0, one grid for each of the first {SAMPLE_PROMPTS} held-out prompts):\n\n![samples](samples.png)\n"
        )
    path = folder / "README.md"
    path.write_text(text)
    return path
