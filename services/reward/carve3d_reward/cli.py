"""``mrc``: score grids, validate the metric, fetch weights, run the demo.

Every metric setting of :class:`~carve3d_reward.settings.MetricSettings` is a
flag here (``--view-size 64``) and an environment variable (``MRC_VIEW_SIZE``);
flags win. Problems with the input or the environment end in a one-line
``mrc: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
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
def cmd_score(args: argparse.Namespace) -> int:
    from .tools.files import collect_images, print_table, score_files

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
    from .tools.validate import ValidationConfig, print_report, run_validation

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
    from .model import MRCModel
    from .service.server import serve
    from .service.settings import ServiceSettings

    metric = settings_from_args(args)
    values = _values_from_args(args, ServiceSettings, "service_") | {"metric": metric}
    settings = typing.cast(ServiceSettings, _build(ServiceSettings, values))
    model = MRCModel(settings.metric)  # load now: a missing weight is a one-line error, not a crashed worker
    return serve(settings, model, log_level=args.log_level)


# -- mrc cameras -------------------------------------------------------------------------------------------------
def cmd_cameras(args: argparse.Namespace) -> int:
    from .tools.camera_figure import write_camera_figure

    s = settings_from_args(args)
    if s.layout != "2x2":
        raise ConfigError("the camera figure draws the 2x2 layout only")
    path = write_camera_figure(args.out, radius=s.radius, fov_deg=s.fov_deg, azimuth0_deg=s.azimuth0_deg)
    print(f"camera convention figure: {path}")
    return 0


# -- mrc demo --------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo

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
