"""Held-out evaluation: the same prompts and the same initial noise every time, so epochs compare.

Reports the mean MRC of valid samples, the KL to the reference model, the
number of invalid samples, and what MRC does not see (:mod:`.quality`): the
share of samples aligned with their prompt and the diversity between samples of
one prompt (``eval_samples_per_prompt >= 2``). Writes a sheet: each generated
grid next to the grid of its re-rendered views, so a person can see what changed.
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

from .quality import aligned, diversity
from .reporting import BASE_EPOCH, epoch_label, sheet_path

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
    from tqdm import tqdm

    bar = tqdm(
        mine,
        desc=f"{epoch_label(epoch)} evaluation",
        leave=False,
        disable=not (trainer.progress and trainer.acc.is_main_process),
    )
    for idx in bar:
        step_gen.manual_seed(_seed(trainer) + 1 + idx[0])  # each batch's step noise fixed too
        traj = trainer.policy.sample([prompts[i] for i in idx], noise=noise[idx], generator=step_gen)
        futures.append(
            trainer.rewards.submit(traj.images, f"run{trainer.run_id}-eval{epoch_label(epoch)}-i{idx[0]}", renders=True)
        )
        images.append(traj.images.cpu())
        kls.append(trainer.kl(traj).cpu())
    results = trainer.rewards.collect(futures)
    index = [i for idx in mine for i in idx]
    image = torch.cat(images) if images else torch.zeros(0)
    kl = torch.cat(kls) if kls else torch.zeros(0)
    ok = aligned(image, [prompts[i] for i in index]).tolist() if index else []
    per_prompt = cfg.eval_samples_per_prompt

    def on_sheet(i: int) -> bool:  # the first sample of each of the first SHEET_ROWS prompts
        return i % per_prompt == 0 and i // per_prompt < SHEET_ROWS

    # (sample index, MRC or NaN, KL, aligned, the image as uint8, and for the sheet's rows the result)
    rows = [
        (
            i,
            _mrc(r),
            float(k),
            a,
            _uint8(image[n]),
            r if on_sheet(i) else None,
        )
        for n, (i, r, k, a) in enumerate(zip(index, results, kl.tolist(), ok, strict=True))
    ]
    if trainer.world > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda row: row[0])
    mrc = torch.tensor([row[1] for row in rows], dtype=torch.float64)
    kl = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    valid = ~torch.isnan(mrc)
    all_images = torch.stack([row[4] for row in rows]).to(torch.float32) / 255.0 if rows else torch.zeros(0)
    out = {
        "mrc": float(mrc[valid].mean()) if valid.any() else math.nan,
        # standard error of that mean: MRC is heavy-tailed, so a few dozen samples leave it about +-10% uncertain
        "mrc_se": float(mrc[valid].std() / math.sqrt(int(valid.sum()))) if int(valid.sum()) > 1 else math.nan,
        "kl": float(kl.mean()) if kl.numel() else math.nan,
        "invalid": int((~valid).sum()),
        "alignment": 100.0 * sum(row[3] for row in rows) / len(rows) if rows else math.nan,
        "diversity": diversity(all_images, [prompts[row[0]] for row in rows]) if rows else math.nan,
        "sheet": None,
    }
    shown = [row for row in rows if row[5] is not None]
    if trainer.acc.is_main_process and shown:
        path = sheet_path(cfg.run_dir, epoch)
        sheet = sheet_image(
            torch.stack([row[4] for row in shown]).to(torch.float32) / 255.0,
            [row[5] for row in shown],
            [prompts[row[0]] for row in shown],
            epoch,
        )
        sheet.save(_mkdir(path))
        out["sheet"] = str(path)
    return out


def _mrc(result: ScoreResult) -> float:
    return result.mrc if result.valid and result.mrc is not None else math.nan


def _uint8(image: torch.Tensor) -> torch.Tensor:
    """A grid as it goes over the wire (and a quarter of the float size in the gathered rows)."""
    return (image.clamp(0, 1) * 255.0).round().to(torch.uint8)


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
    title = "base model" if epoch == BASE_EPOCH else f"epoch {epoch}"
    draw.text((pad, 4), f"{title}: generated | re-rendered", fill="black", font=font)  # fits the sheet's width
    for row, (img, res, label) in enumerate(zip(images, results, labels, strict=False)):
        y = 24 + row * (size + label_h + pad)
        grid = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        sheet.paste(Image.fromarray(grid).resize((size, size), Image.NEAREST), (pad, y + label_h))
        sheet.paste(Image.fromarray(_renders_grid(res, size)), (2 * pad + size, y + label_h))
        score = f"MRC {res.mrc:.4f}" if res.mrc is not None else res.status
        draw.text((pad, y + 4), f"{label[:48]}  ({score}, {res.status})", fill="black", font=font)
    return sheet
