"""Held-out evaluation: the same prompts and the same initial noise every time, so epochs compare.

Reports the mean MRC of valid samples, the KL to the reference model and the
number of invalid samples, and writes a sheet: each generated grid next to
the grid of its re-rendered views, so a person can see what changed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image, ImageDraw, ImageFont

from carve3d_reward.client import ScoreResult

if TYPE_CHECKING:
    from .trainer import Trainer

SHEET_ROWS = 8


def _seed(trainer: Trainer) -> int:
    from .trainer import _seed as seed

    return seed(trainer.cfg.seed, "eval")


def evaluate_policy(trainer: Trainer, epoch: int) -> dict[str, Any]:
    """Every process evaluates whole batches (batch ``k`` on process ``k % N``) and all results are gathered.

    Batch ``k`` is always samples ``[k * B, (k + 1) * B)`` with step noise seeded by ``k * B``, so the
    numbers (and the sheet, built on process 0 from the first gathered samples) do not depend on the
    number of processes.
    """
    cfg = trainer.cfg
    prompts = [p for p in trainer.test_prompts for _ in range(cfg.eval_samples_per_prompt)]
    gen = torch.Generator().manual_seed(_seed(trainer))
    noise = torch.randn((len(prompts), *trainer.policy.latent_shape()), generator=gen)  # fixed across epochs
    bs = cfg.sample_batch_size
    batches = [list(range(s, min(s + bs, len(prompts)))) for s in range(0, len(prompts), bs)]
    mine = batches[trainer.rank :: trainer.world]
    step_gen = torch.Generator()
    futures, images, kls = [], [], []
    trainer.policy.eval()
    for idx in mine:
        step_gen.manual_seed(_seed(trainer) + 1 + idx[0])  # each batch's step noise fixed too
        traj = trainer.policy.sample([prompts[i] for i in idx], noise=noise[idx], generator=step_gen)
        futures.append(trainer.rewards.submit(traj.images, f"run{trainer.run_id}-eval{epoch}-i{idx[0]}", renders=True))
        images.append(traj.images.cpu())
        kls.append(traj.kl.cpu())
    results = trainer.rewards.collect(futures)
    index = [i for idx in mine for i in idx]
    image = torch.cat(images) if images else torch.zeros(0)
    kl = torch.cat(kls) if kls else torch.zeros(0)
    # (sample index, MRC or NaN, KL, and for the sheet's rows the image and its result) of every sample
    rows = [
        (i, r.mrc if r.valid and r.mrc is not None else math.nan, float(k), (image[n], r) if i < SHEET_ROWS else None)
        for n, (i, r, k) in enumerate(zip(index, results, kl.tolist(), strict=True))
    ]
    if trainer.world > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda row: row[0])
    mrc = torch.tensor([row[1] for row in rows], dtype=torch.float64)
    kl = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    valid = ~torch.isnan(mrc)
    out = {
        "mrc": float(mrc[valid].mean()) if valid.any() else math.nan,
        "kl": float(kl.mean()) if kl.numel() else math.nan,
        "invalid": int((~valid).sum()),
        "sheet": None,
    }
    shown = [row for row in rows if row[3] is not None]
    if trainer.acc.is_main_process and shown:
        path = cfg.run_dir / "eval" / f"epoch-{epoch:04d}.png"
        sheet = sheet_image(
            torch.stack([row[3][0] for row in shown]),
            [row[3][1] for row in shown],
            [prompts[row[0]] for row in shown],
            epoch,
        )
        sheet.save(_mkdir(path))
        out["sheet"] = str(path)
    return out


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _renders_grid(result: ScoreResult, size: int) -> np.ndarray:
    """The re-rendered views as a 2x2 grid of ``size x size`` (white if there are none)."""
    half = size // 2
    canvas = np.full((size, size, 3), 255, np.uint8)
    for k, view in enumerate(result.render_arrays()[:4]):
        tile = np.asarray(Image.fromarray(view).resize((half, half), Image.BICUBIC))
        r, c = divmod(k, 2)
        canvas[r * half : (r + 1) * half, c * half : (c + 1) * half] = tile
    return canvas


def sheet_image(images: torch.Tensor, results: list[ScoreResult], labels: list[str], epoch: int) -> Image.Image:
    """Rows of (generated grid | re-rendered grid), labelled with prompt and MRC."""
    size = max(128, images.shape[-1])
    label_h, pad = 28, 6
    width = 2 * size + 3 * pad
    height = len(images) * (size + label_h + pad) + 24
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 4), f"epoch {epoch}: generated | re-rendered from the reconstruction", fill="black", font=font)
    for row, (img, res, label) in enumerate(zip(images, results, labels, strict=False)):
        y = 24 + row * (size + label_h + pad)
        grid = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        sheet.paste(Image.fromarray(grid).resize((size, size), Image.NEAREST), (pad, y + label_h))
        sheet.paste(Image.fromarray(_renders_grid(res, size)), (2 * pad + size, y + label_h))
        score = f"MRC {res.mrc:.4f}" if res.mrc is not None else res.status
        draw.text((pad, y + 4), f"{label[:48]}  ({score}, {res.status})", fill="black", font=font)
    return sheet
