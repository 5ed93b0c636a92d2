"""Throughput and latency of the LRM reconstructor: reconstruct + re-render one batch of 2x2 grids.

One timed call is what the metric does per batch: resize the 4 views to the
model's input size, encode, build the triplanes, render the 4 views back at
``--view-size``. Reports grids/s and p50/p99 latency per batch size. Without
``--checkpoint`` the weights are random (said in the output): the cost of a
forward pass does not depend on the weights' values.

    .venv/bin/python bench/bench_lrm.py                                  # tiny preset, CPU: a smoke run
    .venv/bin/python bench/bench_lrm.py --preset instant-nerf-large --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.lrm import build_generator, get_preset
from carve3d_reward.lrm.checkpoint import checkpoint_digest, load_generator
from carve3d_reward.lrm.reconstructor import LRMOptions, LRMReconstructor


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint", default=None, help="weights file (default: random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--view-size", type=int, default=None, help="view and render size (default: 128; tiny: 32)")
    parser.add_argument("--samples", type=int, default=None, help="samples per ray (default: the preset's)")
    parser.add_argument("--chunk-rays", type=int, default=1 << 13)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    config = get_preset(args.preset)
    view = args.view_size or (32 if config.name == "tiny" else 128)
    if args.checkpoint:
        model, weights = load_generator(config, args.checkpoint), f"checkpoint {checkpoint_digest(args.checkpoint)[:8]}"
    else:
        torch.manual_seed(0)
        model, weights = build_generator(config), "RANDOM weights (no --checkpoint): timings only, outputs meaningless"
    options = LRMOptions(
        dtype=args.dtype, samples_per_ray=args.samples, chunk_rays=args.chunk_rays, compile=args.compile
    )
    rec = LRMReconstructor(model, digest="0" * 64, options=options).to(args.device)
    cams = INSTANT3D_2X2.cameras(radius=2.7, fov_deg=50.0)
    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        views = torch.ones(batch, 4, 3, view, view, device=device)
        views[..., view // 4 : 3 * view // 4, view // 4 : 3 * view // 4] = 0.4

        def step(views: torch.Tensor = views) -> None:
            rec.render(rec.reconstruct(views, cams), cams, view)

        for _ in range(args.warmup):
            step()
        sync()
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        p50 = statistics.median(times)
        rows.append(
            {
                "batch": batch,
                "grids_per_s": batch / p50,
                "p50_ms": 1e3 * p50,
                "p99_ms": 1e3 * percentile(times, 99),
            }
        )
    header = {
        "preset": config.name,
        "weights": weights,
        "device": device_name,
        "dtype": args.dtype,
        "view_size": view,
        "input_size": config.input_size,
        "samples_per_ray": args.samples or config.samples_per_ray,
        "iters": args.iters,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps({**header, "results": rows}, indent=2))
        return
    print(" ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'batch':>6} {'grids/s':>10} {'p50 ms':>10} {'p99 ms':>10}")
    for r in rows:
        print(f"{r['batch']:>6} {r['grids_per_s']:>10.2f} {r['p50_ms']:>10.1f} {r['p99_ms']:>10.1f}")


if __name__ == "__main__":
    main()
