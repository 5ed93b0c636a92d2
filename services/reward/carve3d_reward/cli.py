"""``mrc``: score grids, validate the metric, fetch weights, run the demo.

Every metric setting of :class:`~carve3d_reward.settings.MetricSettings` is a
flag here (``--view-size 64``) and an environment variable (``MRC_VIEW_SIZE``);
flags win. Problems with the input or the environment end in a one-line
``mrc: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from . import __version__
from .errors import ConfigError, InvalidInputError, MRCError
from .settings import MetricSettings

EXIT_USAGE = 2
EXIT_INVALID_SAMPLES = 1


# -- settings as flags --------------------------------------------------------------------------------
def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseSettings] = MetricSettings,
    *,
    dest_prefix: str = "setting_",
    title: str = "metric settings (also MRC_<NAME> environment variables)",
) -> None:
    """One ``--flag`` per settings field; unset flags fall back to ``MRC_*`` and the defaults."""
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseSettings):
            continue  # nested settings get their own group
        choices = None
        if typing.get_origin(info.annotation) is typing.Literal:
            choices = list(typing.get_args(info.annotation))
        default = info.default
        shown = "native" if name == "view_size" and default is None else default
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=dest_prefix + name,
            default=None,
            choices=choices,
            metavar=None if choices else name.split("_")[-1].upper(),
            help=f"{info.description} (default: {'unset' if name == 'auth_token' else shown})",
        )


def _values_from_args(args: argparse.Namespace, model: type[BaseSettings], dest_prefix: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for name in model.model_fields:
        value = getattr(args, dest_prefix + name, None)
        if value is not None:
            values[name] = None if name == "view_size" and value.lower() in ("native", "none") else value
    return values


def _build(model: type[BaseSettings], values: dict[str, object]) -> BaseSettings:
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][-1]) if err["loc"] else "settings"
        raise ConfigError(f"--{field.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


def settings_from_args(args: argparse.Namespace, **overrides: object) -> MetricSettings:
    values = _values_from_args(args, MetricSettings, "setting_") | overrides
    return typing.cast(MetricSettings, _build(MetricSettings, values))


# -- mrc score ------------------------------------------------------------------------------------------
def collect_images(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted, recursive)."""
    from .grid import IMAGE_SUFFIXES

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
) -> tuple[list[dict[str, object]], int]:
    """Score image files in batches; returns one row per file and the number of invalid files."""
    import torch
    from tqdm import tqdm

    from .grid import load_grid, split_grid, to_grid_tensor
    from .metric import MRC

    metric = MRC(settings)
    rows: list[dict[str, object]] = [{} for _ in files]
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    invalid = 0

    def flush(key: tuple[int, ...]) -> None:
        items = pending.pop(key, [])
        if not items:
            return
        views = torch.stack([v for _, v in items])
        result = metric.score_views(views, return_renders=renders_dir is not None)
        if renders_dir is not None:
            from .sheets import save_sheets

            save_sheets(result, [files[i].name for i, _ in items], renders_dir)
        for k, (i, _) in enumerate(items):
            rows[i] = {"file": str(files[i])} | result.grid(k).to_dict()

    bar = tqdm(files, desc="scoring", unit="grid", disable=not progress or len(files) < 2, file=sys.stderr)
    for i, path in enumerate(bar):
        try:
            grid = load_grid(path, metric.layout, view_size=settings.view_size)  # as the service decodes it
            views = split_grid(to_grid_tensor(grid), metric.layout)[0]
        except InvalidInputError as exc:
            message = str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}"
            rows[i] = {"file": str(path), "status": "invalid", "error": message, "metric": metric.metric_id}
            invalid += 1
            continue
        key = tuple(views.shape)
        pending.setdefault(key, []).append((i, views))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    return rows, invalid


def print_table(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MRC (lower = more 3D-consistent)")
    for col in ("file", "MRC", "reward", "status", "per-view distance"):
        table.add_column(col, justify="right" if col in ("MRC", "reward") else "left")
    for row in rows:
        if row.get("status") == "invalid":
            table.add_row(str(row["file"]), "-", "-", "[red]invalid[/red]", str(row["error"]))
            continue
        views = row["views"]
        assert isinstance(views, list)
        dists = " ".join(f"{v['distance']:.4f}" + ("(empty)" if v["empty"] else "") for v in views)
        status = str(row["status"])
        table.add_row(
            Path(str(row["file"])).name,
            f"{row['mrc']:.4f}",
            f"{row['reward']:.4f}",
            status if status == "ok" else f"[yellow]{status}[/yellow]",
            dists,
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if rows and "metric" in rows[0]:
        console.print(f"metric: {rows[0]['metric']}")


def cmd_score(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    files = collect_images(args.paths)
    rows, invalid = score_files(
        files, settings, batch_size=args.batch_size, renders_dir=args.save_renders, progress=not args.json
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
        if args.save_renders is not None:
            print(f"sheets written to {args.save_renders}")
    if invalid and len(files) == 1:
        raise InvalidInputError(str(rows[0]["error"]))
    return EXIT_INVALID_SAMPLES if invalid else 0


# -- mrc validate -----------------------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import ValidationConfig, print_report, run_validation

    settings = settings_from_args(args)
    config = ValidationConfig(
        objects=args.objects,
        levels=tuple(float(x) for x in args.levels.split(",")),
        kinds=tuple(args.kinds.split(",")),
        distances=tuple(args.distances.split(",")),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    report = run_validation(settings, config, out_dir=args.out)
    print_report(report)
    return 0 if report.all_monotone or not args.strict else 1


# -- mrc weights --------------------------------------------------------------------------------------------
def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from .weights import fetch_lpips_trunk

    if args.lrm:  # the LRM alone (the LPIPS trunk has its own --lpips run): Hugging Face cache, sha256-checked
        from .lrm.checkpoint import fetch_checkpoint

        print(f"lrm {args.lrm} weights: {fetch_checkpoint(args.lrm)}")
        return 0
    nets = ["alex", "vgg"] if args.lpips == "all" else [args.lpips]
    for net in nets:
        path = fetch_lpips_trunk(net)
        print(f"lpips-{net} trunk weights: {path}")
    return 0


# -- mrc serve ---------------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .model import MRCModel
    from .service.app import create_app
    from .service.server import JSONErrorH11Protocol
    from .service.settings import ServiceSettings

    metric = settings_from_args(args)
    values = _values_from_args(args, ServiceSettings, "service_") | {"metric": metric}
    settings = typing.cast(ServiceSettings, _build(ServiceSettings, values))
    model = MRCModel(settings.metric)  # load now: a missing weight is a one-line error, not a crashed worker

    def run_gateway(**app_kwargs: typing.Any) -> None:
        uvicorn.run(
            create_app(settings, model=model, **app_kwargs),
            host=settings.host,
            port=settings.port,
            http=JSONErrorH11Protocol,
            timeout_graceful_shutdown=settings.drain_timeout_s,
            log_level=args.log_level,
            access_log=args.log_level == "debug",
        )

    if settings.engine == "inprocess":
        print(f"mrc serve: {model.metric_id} on http://{settings.host}:{settings.port}", file=sys.stderr)
        # uvicorn drains on SIGTERM, then re-raises it; a handler of ours turns that into a clean exit 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        run_gateway()
        return 0

    # engine "triton": the gateway forwards to Triton's model "mrc" (docs/triton.md); with no --triton-url,
    # Triton is started here (PyTriton: a tritonserver child process) and stopped on the way out.
    import os
    import tempfile
    import threading

    from .service.triton_engine import TritonEngine
    from .triton.binding import MRCTriton, check_environment

    triton: MRCTriton | None = None
    url = settings.triton_url
    stopping, died = threading.Event(), threading.Event()
    if url is None:
        check_environment()

        def stop(signum: int, _frame: object) -> None:
            # SIGTERM while Triton starts, or re-raised by uvicorn after its drain: unwind through the
            # `finally` below, which stops tritonserver, so no server outlives this process.
            raise SystemExit(1 if died.is_set() else 0)

        signal.signal(signal.SIGTERM, stop)
        log_file = None
        if args.log_level not in ("debug", "info"):  # Triton's own log, which is chatty, goes to a file
            log_file = Path(tempfile.gettempdir()) / f"mrc-triton-{os.getpid()}.log"
        triton = MRCTriton(settings, models=[model], log_file=log_file).start()
        url = triton.grpc_url

        def watch(server: MRCTriton) -> None:  # Triton gone on its own: drain and exit 1 (the supervisor restarts)
            while not stopping.wait(1.0):
                if not server.is_alive() and not stopping.is_set():
                    died.set()
                    print("mrc serve: error: triton stopped unexpectedly; shutting down", file=sys.stderr)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

        threading.Thread(target=watch, args=(triton,), name="mrc-triton-watch", daemon=True).start()
        print(
            f"mrc serve: triton (PyTriton) grpc {triton.grpc_url}, http {triton.http_url}, "
            f"metrics {triton.metrics_url}" + (f", log {log_file}" if log_file else ""),
            file=sys.stderr,
        )
    try:
        engine = TritonEngine(
            url, metric_id=model.metric_id, max_batch=settings.max_batch, timeout_s=settings.request_timeout_s
        )
        print(f"mrc serve: {model.metric_id} on http://{settings.host}:{settings.port} (triton {url})", file=sys.stderr)
        if triton is None:  # an external Triton: SIGTERM is only the gateway's drain, as for inprocess
            signal.signal(signal.SIGTERM, lambda *_: None)
        run_gateway(engine=engine)
    finally:
        stopping.set()
        if triton is not None:
            triton.stop()
    return 1 if died.is_set() else 0


# -- mrc cameras -------------------------------------------------------------------------------------------------
def cmd_cameras(args: argparse.Namespace) -> int:
    from .camera_figure import write_camera_figure

    s = settings_from_args(args)
    if s.layout != "2x2":
        raise ConfigError("the camera figure draws the 2x2 layout only")
    path = write_camera_figure(args.out, radius=s.radius, fov_deg=s.fov_deg, azimuth0_deg=s.azimuth0_deg)
    print(f"camera convention figure: {path}")
    return 0


# -- mrc demo --------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    settings = settings_from_args(args)
    return run_demo(settings, out_dir=args.out, objects=args.objects, seed=args.seed)


# -- entry point -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrc", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score grid images (files or folders)")
    p.add_argument("paths", nargs="+", help="grid image files or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--save-renders", type=Path, metavar="DIR", help="write input|re-render|crop sheets as PNG")
    p.add_argument("--batch-size", type=int, default=8, help="grids scored at once (default: 8)")
    add_settings_flags(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("validate", help="MRC vs controlled inconsistency on synthetic objects (paper Sec. 3.3)")
    p.add_argument("--objects", type=int, default=20, help="synthetic objects (default: 20)")
    p.add_argument("--levels", default="0,0.2,0.4,0.6,0.8,1.0", help="inconsistency levels in [0, 1]")
    p.add_argument("--kinds", default="patch,pose,colour", help="inconsistency kinds")
    p.add_argument("--distances", default="l1,ssim", help="distances to compare (e.g. l1,ssim,lpips-alex)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=10, help="grids scored at once (default: 10)")
    p.add_argument("--out", type=Path, default=Path("out/validate"), help="folder for the plot and tables")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every curve is monotone")
    add_settings_flags(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("weights", help="manage model weights")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    f = wsub.add_parser("fetch", help="download weights into the local cache (needs internet once)")
    f.add_argument("--lpips", choices=["alex", "vgg", "all"], default="alex", help="LPIPS trunk (default: alex)")
    f.add_argument(
        "--lrm", default=None, metavar="PRESET", help="LRM weights instead: instant-nerf-large or instant-nerf-base"
    )
    f.set_defaults(func=cmd_weights_fetch)

    p = sub.add_parser("serve", help="run the reward service (POST /mrc)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from .service.settings import ServiceSettings

    add_settings_flags(p, ServiceSettings, dest_prefix="service_", title="service settings (also MRC_<NAME>)")
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cameras", help="draw the camera convention (the picture in docs/cameras.md)")
    p.add_argument("--out", type=Path, default=Path("out/cameras.png"))
    add_settings_flags(p)
    p.set_defaults(func=cmd_cameras)

    p = sub.add_parser("demo", help="generate synthetic grids, score them, write sheets (the quick start)")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--objects", type=int, default=3, help="synthetic objects (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    add_settings_flags(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except MRCError as exc:
        print(f"mrc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mrc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
