"""Scoring image files: what ``mrc score`` and ``mrc demo`` do, as a library.

Files are decoded exactly as the service decodes a request's grids
(:func:`carve3d_reward.grid.load_grid`), scored in batches of equal size, and
answered as one row per file: the file's name and its ``GridScore`` on the
wire (:meth:`carve3d_reward.scores.GridScore.to_wire`), so a row reads the
same whether it came from the CLI or the service. A file that cannot be used
is an ``invalid`` row with the reason, never an exception for the others.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import InvalidInputError
from ..grid import IMAGE_SUFFIXES, load_grid, split_grid, to_grid_tensor
from ..metric import MRC
from ..scores import GridScore, Status
from ..settings import MetricSettings

Row = dict[str, Any]


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted, recursive)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InvalidInputError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInputError(f"{path}: no such file or folder")
    return files


def score_files(
    files: list[Path], settings: MetricSettings, *, batch_size: int, renders_dir: Path | None, progress: bool
) -> tuple[list[Row], int]:
    """Score image files in batches; returns one row per file and the number of invalid files."""
    metric = MRC(settings)
    rows: list[Row] = [{} for _ in files]
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    invalid = 0

    def flush(key: tuple[int, ...]) -> None:
        items = pending.pop(key, [])
        if not items:
            return
        result = metric.score_views(torch.stack([v for _, v in items]), return_renders=renders_dir is not None)
        if renders_dir is not None:
            from .sheets import save_sheets

            save_sheets(result, [files[i].name for i, _ in items], renders_dir)
        for (i, _), score in zip(items, result.scores(), strict=True):
            rows[i] = {"file": str(files[i])} | score.to_wire()

    bar = tqdm(files, desc="scoring", unit="grid", disable=not progress or len(files) < 2, file=sys.stderr)
    for i, path in enumerate(bar):
        try:
            grid = load_grid(path, metric.layout, view_size=settings.view_size)  # as the service decodes it
            views = split_grid(to_grid_tensor(grid), metric.layout)[0]
        except InvalidInputError as exc:
            message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            rows[i] = {"file": str(path)} | GridScore.invalid(message, metric.metric_id).to_wire()
            invalid += 1
            continue
        key = tuple(views.shape)
        pending.setdefault(key, []).append((i, views))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    return rows, invalid


def print_table(rows: list[Row]) -> None:
    """The rows as a table on the terminal: one line per file, invalid files with their reason."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MRC (lower = more 3D-consistent)")
    for col in ("file", "MRC", "reward", "status", "per-view distance"):
        table.add_column(col, justify="right" if col in ("MRC", "reward") else "left")
    for row in rows:
        if row["status"] == Status.INVALID:
            table.add_row(str(row["file"]), "-", "-", "[red]invalid[/red]", str(row["error"]))
            continue
        dists = " ".join(f"{v['distance']:.4f}" + ("(empty)" if v["empty"] else "") for v in row["views"])
        status = str(row["status"])
        table.add_row(
            Path(str(row["file"])).name,
            f"{row['mrc']:.4f}",
            f"{row['reward']:.4f}",
            status if status == Status.OK else f"[yellow]{status}[/yellow]",
            dists,
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if rows:
        console.print(f"metric: {rows[0]['metric']}")
