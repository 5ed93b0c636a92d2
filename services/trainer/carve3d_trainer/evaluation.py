"""Held-out evaluation: the same prompts and the same initial noise every time, so epochs compare.

Reports the mean MRC of valid samples, the KL to the reference model, the
number of invalid samples, and what MRC does not see (:mod:`.quality`): the
share of samples aligned with their prompt and the diversity between samples of
one prompt (``eval_samples_per_prompt >= 2``). Writes a sheet: each generated
grid next to the grid of its re-rendered views, so a person can see what changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from carve3d_reward.grid import to_uint8_image
from carve3d_reward.pixels import to_uint8
from carve3d_reward.scores import GridScore

from .policies.base import DiffusionPolicy, Trajectory
from .quality import aligned, diversity
from .rewards import RewardBackend
from .run_layout import BASE_EPOCH, epoch_label, sheet_path
from .seeding import derive_seed
from .stats import EVAL_FIELDS

SHEET_ROWS = 8


@dataclass(frozen=True)
class HeldOut:
    """What every evaluation of a run draws: the same prompts, the same initial noise and step noise."""

    prompts: list[str]
    samples_per_prompt: int
    batch_size: int
    seed: int  # the run's; the noise is seeded by it


@dataclass(frozen=True)
class Evaluation:
    mrc: float  # mean over the valid samples
    mrc_se: float  # its standard error: MRC is heavy-tailed, so a few dozen samples leave it about +-10% uncertain
    kl: float
    invalid: int
    alignment: float  # % of samples that draw their prompt's colours
    diversity: float  # between samples of one prompt
    sheet: str | None  # the sheet's path (process 0 only)

    def record(self) -> dict[str, Any]:
        """The numbers as a metrics record keeps them (``eval_*``)."""
        return {key: getattr(self, key.removeprefix("eval_")) for key in EVAL_FIELDS}


def evaluate_policy(
    policy: DiffusionPolicy,
    rewards: RewardBackend,
    held_out: HeldOut,
    *,
    epoch: int,
    kl: Callable[[Trajectory], Tensor],
    run_dir: Path,
    request_prefix: str,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
) -> Evaluation:
    """Every process evaluates whole batches (batch ``k`` on process ``k % N``) and all results are gathered.

    Batch ``k`` is always samples ``[k * B, (k + 1) * B)`` with step noise seeded by ``k * B``, so the
    numbers (and the sheet, built on process 0 from the first gathered samples) do not depend on the
    number of processes. ``kl``: a trajectory's per-sample KL, as the training rounds measure it.
    """
    per_prompt = held_out.samples_per_prompt
    prompts = [p for p in held_out.prompts for _ in range(per_prompt)]
    seed = derive_seed(held_out.seed, "eval")
    noise = torch.randn((len(prompts), *policy.latent_shape()), generator=torch.Generator().manual_seed(seed))
    bs = held_out.batch_size
    batches = [list(range(s, min(s + bs, len(prompts)))) for s in range(0, len(prompts), bs)]
    mine = batches[rank::world]
    step_gen = torch.Generator()
    futures, images, kls = [], [], []
    policy.eval()
    from tqdm import tqdm

    for idx in tqdm(mine, desc=f"{epoch_label(epoch)} evaluation", leave=False, disable=not progress):
        step_gen.manual_seed(seed + 1 + idx[0])  # each batch's step noise fixed too
        traj = policy.sample([prompts[i] for i in idx], noise=noise[idx], generator=step_gen)
        request_id = f"{request_prefix}-eval{epoch_label(epoch)}-i{idx[0]}"
        futures.append(rewards.submit(traj.images, request_id, renders=True))
        images.append(traj.images.cpu())
        kls.append(kl(traj).cpu())
    results = rewards.collect(futures)
    index = [i for idx in mine for i in idx]
    image = torch.cat(images) if images else torch.zeros(0)
    kl_all = torch.cat(kls) if kls else torch.zeros(0)
    ok = aligned(image, [prompts[i] for i in index]).tolist() if index else []

    def on_sheet(i: int) -> bool:  # the first sample of each of the first SHEET_ROWS prompts
        return i % per_prompt == 0 and i // per_prompt < SHEET_ROWS

    # (sample index, MRC or NaN, KL, aligned, the image as uint8, and for the sheet's rows the result)
    rows = [
        (i, _mrc(r), float(k), a, to_uint8(image[n]), r if on_sheet(i) else None)
        for n, (i, r, k, a) in enumerate(zip(index, results, kl_all.tolist(), ok, strict=True))
    ]
    if world > 1:
        rows = gather_object(rows)
    rows.sort(key=lambda row: row[0])
    mrc = torch.tensor([row[1] for row in rows], dtype=torch.float64)
    kl_rows = torch.tensor([row[2] for row in rows], dtype=torch.float64)
    valid = ~torch.isnan(mrc)
    n_valid = int(valid.sum())
    all_images = torch.stack([row[4] for row in rows]).to(torch.float32) / 255.0 if rows else torch.zeros(0)
    sheet = None
    shown = [row for row in rows if row[5] is not None]
    if rank == 0 and shown:
        path = sheet_path(run_dir, epoch)
        image_sheet = sheet_image(
            torch.stack([row[4] for row in shown]).to(torch.float32) / 255.0,
            [row[5] for row in shown],
            [prompts[row[0]] for row in shown],
            epoch,
        )
        image_sheet.save(_mkdir(path))
        sheet = str(path)
    return Evaluation(
        mrc=float(mrc[valid].mean()) if valid.any() else math.nan,
        mrc_se=float(mrc[valid].std() / math.sqrt(n_valid)) if n_valid > 1 else math.nan,
        kl=float(kl_rows.mean()) if kl_rows.numel() else math.nan,
        invalid=int((~valid).sum()),
        alignment=100.0 * sum(row[3] for row in rows) / len(rows) if rows else math.nan,
        diversity=diversity(all_images, [prompts[row[0]] for row in rows]) if rows else math.nan,
        sheet=sheet,
    )


def _mrc(result: GridScore) -> float:
    return result.mrc if result.valid and result.mrc is not None else math.nan


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _renders_grid(result: GridScore, size: int) -> np.ndarray:
    """The re-rendered views as a 2x2 grid of ``size x size`` (white if there are none)."""
    half = size // 2
    canvas = np.full((size, size, 3), 255, np.uint8)
    for k, view in enumerate(result.render_arrays()[:4]):
        tile = np.asarray(Image.fromarray(view).resize((half, half), Image.BICUBIC))
        r, c = divmod(k, 2)
        canvas[r * half : (r + 1) * half, c * half : (c + 1) * half] = tile
    return canvas


def sheet_image(images: torch.Tensor, results: list[GridScore], labels: list[str], epoch: int) -> Image.Image:
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
        grid = to_uint8_image(img)
        sheet.paste(Image.fromarray(grid).resize((size, size), Image.NEAREST), (pad, y + label_h))
        sheet.paste(Image.fromarray(_renders_grid(res, size)), (2 * pad + size, y + label_h))
        score = f"MRC {res.mrc:.4f}" if res.mrc is not None else res.status
        draw.text((pad, y + 4), f"{label[:48]}  ({score}, {res.status})", fill="black", font=font)
    return sheet
