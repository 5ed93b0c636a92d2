"""Throughput of the batched MRC metric against a per-sample, per-view loop.

The loop has the structure of the authors' published reward code: one grid at
a time, one view at a time, the box found with array indexing, each crop
resized on its own. Both sides use the same reconstructor and distance, so the
ratio isolates what batching and vectorising buy.

    .venv/bin/python bench/bench_metric.py [--device cuda] [--batches 1,4,16] [--grid-size 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from carve3d_reward.grid import join_grid, split_grid
from carve3d_reward.metric import MRC
from carve3d_reward.settings import MetricSettings
from carve3d_reward.tools.synthetic import inconsistent_views, random_scenes


def loop_mrc(metric: MRC, grids: torch.Tensor) -> torch.Tensor:
    """MRC the way the reference code computes it: per sample, per view."""
    s = metric.settings
    scores = []
    for grid in grids:
        views = metric.resize_views(split_grid(grid[None].to(metric.device), metric.layout))
        scene = metric.reconstructor.reconstruct(views, metric.cameras)
        size = views.shape[-1]
        renders = metric.reconstructor.render(scene, metric.cameras, size)
        dists = []
        for v in range(views.shape[1]):
            view, render = views[0, v], renders[0, v]
            ys, xs = torch.nonzero((view < s.fg_threshold).any(dim=0), as_tuple=True)
            if len(ys) == 0:
                dists.append(metric.distance.worst)
                continue
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
            h, w = y1 - y0 + 1, x1 - x0 + 1
            side = max(h, w)
            y0 -= (side - h + 1) // 2
            x0 -= (side - w + 1) // 2
            y0, x0 = y0 - s.bbox_pad, x0 - s.bbox_pad
            side += 2 * s.bbox_pad
            pad = side
            crops = []
            for img in (view, render):
                padded = F.pad(img[None], (pad, pad, pad, pad), value=1.0)
                crop = padded[:, :, y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
                crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1))
            dists.append(float(metric.distance(crops[0], crops[1])[0]))
        scores.append(sum(dists) / len(dists))
    return torch.tensor(scores)


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--grid-size", type=int, default=256)
    parser.add_argument("--distance", default="l1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    view = args.grid_size // 2
    settings = MetricSettings(device=args.device, distance=args.distance, view_size=view)
    metric = MRC(settings)
    batches = [int(b) for b in args.batches.split(",")]
    scenes = random_scenes(max(batches), seed=0)
    grids = join_grid(inconsistent_views(scenes, metric.cameras, view, "patch", 0.3), metric.layout)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    rows = []
    for b in batches:
        batch = grids[:b]
        torch.testing.assert_close(metric(batch).mrc, loop_mrc(metric, batch), atol=2e-4, rtol=1e-3)
        t_batched = timed(lambda batch=batch: metric(batch), args.repeats, sync)
        t_loop = timed(lambda batch=batch: loop_mrc(metric, batch), args.repeats, sync)
        rows.append(
            {
                "batch": b,
                "batched_grids_per_s": b / t_batched,
                "loop_grids_per_s": b / t_loop,
                "speedup": t_loop / t_batched,
            }
        )
    if args.json:
        print(
            json.dumps(
                {"device": args.device, "grid_size": args.grid_size, "metric": metric.metric_id, "rows": rows}, indent=2
            )
        )
        return
    print(f"MRC throughput, {args.grid_size}x{args.grid_size} grids, device={args.device}, metric={metric.metric_id}")
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'batch':>5}  {'batched grids/s':>16}  {'loop grids/s':>13}  {'ratio batched/loop':>18}")
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['batched_grids_per_s']:>16.2f}  {r['loop_grids_per_s']:>13.2f}"
            f"  {r['speedup']:>17.2f}x"
        )


if __name__ == "__main__":
    main()
