"""``carve3d-train``: run, resume and inspect Carve3D RL finetuning.

Settings come from defaults < ``CARVE3D_*`` env vars < ``--config PRESET|FILE``
< ``--set key=value`` (dotted keys, e.g. ``--set algorithm.beta=0``) < a flag
per setting (``--algorithm.beta 0``, :mod:`.config_flags`); ``carve3d-train
config`` prints the result. Problems end in one ``carve3d-train: error: ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from carve3d_reward.errors import ConfigError, MRCError

from . import __version__
from .run_layout import REPORT

if TYPE_CHECKING:
    from .config import TrainConfig


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The settings ``train`` and ``config`` resolve: defaults < env < ``--config`` < ``--set`` < flags."""
    from .config import config_file, load_config
    from .config_flags import flag_settings, parse_set

    overrides = parse_set(args.set) | flag_settings(args)
    return load_config(config_file(args.config) if args.config else None, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer

    config = resolve_config(args)
    run_dir = config.run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume and not args.overwrite:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to replace it")
    if args.overwrite and not args.resume:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    trainer = Trainer(config, progress=not args.no_progress)
    main_process = trainer.acc.is_main_process
    try:
        if args.resume and trainer.resume() and main_process:
            print(f"resuming {run_dir} after epoch {trainer.state.epoch}", file=sys.stderr)
        trainer.train()
    finally:
        trainer.close()
    if main_process:
        print(f"report: {run_dir / REPORT}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    print(config.to_json(token="omit"))
    if config.reward.token is not None:
        print("carve3d-train: reward.token is set and not printed ($MRC_AUTH_TOKEN gives it back)", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config_flags import parse_set
    from .demo import run_demo

    overrides = parse_set(args.set)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.policy_path:
        overrides["policy.path"] = args.policy_path
    run_demo(args.out, overrides=overrides, progress=not args.no_progress)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .reporting import before_after, compare_runs, load_history

    runs: dict[str, Path] = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        runs[label if sep else Path(item).name] = Path(path if sep else item)
    for label, run_dir in runs.items():
        summary = before_after(load_history(run_dir))
        if summary is None:
            print(f"{label}: no base evaluation and later one to compare")
            continue
        (m0, m1), (a0, a1) = summary["mrc"], summary["alignment"]
        print(
            f"{label}: held-out MRC {m0:.4f} -> {m1:.4f} ({summary['mrc_change']:+.1%}), alignment "
            f"{a0:.1f}% -> {a1:.1f}%, final KL {summary['train_kl']:.3g}, epochs {summary['final_epoch'] + 1}"
        )
    print(f"figure: {compare_runs(runs, args.out)}")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from .prompts import builtin_sets, load_prompts

    if args.name:
        print("\n".join(load_prompts(args.name)))
    else:
        for name in builtin_sets():
            print(f"builtin:{name}  ({len(load_prompts('builtin:' + name))} prompts)")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    import torch

    from .policies.base import SamplingConfig
    from .policies.tiny import TinyConfig, TinyGridPolicy
    from .prompts import BUILTIN_PREFIX, load_prompts
    from .sft import SAMPLE_PROMPTS, plot_losses, sample_strip, train_sft, write_model_card

    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
    if args.image_size < 16 or args.image_size % 8:
        raise ConfigError(f"--image-size must be a multiple of 8 and >= 16, got {args.image_size}")
    source = load_prompts(args.prompts) if args.prompts else None
    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the initial weights
    policy = TinyGridPolicy(TinyConfig(image_size=args.image_size))
    losses = train_sft(
        policy,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        prompts=source,
        checkpoint_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    plot_losses(losses, args.out / "loss.png")
    sampling = SamplingConfig(num_steps=10, guidance_scale=3.0)  # the demo's sampling
    card_policy = TinyGridPolicy.from_pretrained(args.out, sampling=sampling)
    sample_strip(card_policy, load_prompts(f"{BUILTIN_PREFIX}shapes-test")[:SAMPLE_PROMPTS], args.out / "samples.png")
    command = (
        f"carve3d-train sft --out {args.out} --steps {args.steps} --batch-size {args.batch_size} --seed {args.seed} "
        f"--image-size {args.image_size} --lr {args.lr:g}" + (f" --prompts {args.prompts}" if args.prompts else "")
    )
    write_model_card(args.out, command, losses, time.perf_counter() - start, sampling)
    tail = losses[-max(1, len(losses) // 10) :]
    print(f"sft: {len(losses)} steps, final loss {sum(tail) / len(tail):.4f}; weights in {args.out}")
    return 0


SETTINGS_HELP = (
    "Settings: defaults < CARVE3D_* env vars < --config < --set KEY=VALUE < the flags below (defaults shown are "
    "the code's). --config NAME (no / and no .) is a preset shipped with the package (e.g. demo, the demo's "
    "settings, also configs/demo.json), anything else a JSON file's path."
)


SETTINGS_USAGE = "%(prog)s [--config PRESET|FILE] [--set KEY=VALUE ...] [--SETTING VALUE ...]".replace(
    "%(prog)s", "carve3d-train {command}"
)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    from .config_flags import add_setting_flags

    parser.add_argument("--config", metavar="PRESET|FILE", help="settings file: a shipped preset's name or a path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a setting by its dotted key (repeatable)"
    )
    add_setting_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carve3d-train", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="run (or --resume) RL finetuning against the MRC reward",
        usage=SETTINGS_USAGE.format(command="train") + " [--resume] [--overwrite] [--no-progress]",
        description="Run (or --resume) RL finetuning against the MRC reward. " + SETTINGS_HELP,
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --run-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_settings(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "config",
        help="print the resolved settings as JSON (a file that --config reads back)",
        usage=SETTINGS_USAGE.format(command="config"),
        description="Print the settings train would run with, as JSON (--config reads it back). " + SETTINGS_HELP,
    )
    _add_settings(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="the miniature Carve3D: start the reward service, finetune the shipped CPU model")
    p.add_argument("--out", type=Path, default=Path("out/rl-demo"))
    p.add_argument("--epochs", type=int, help="default: the demo's (see carve3d_trainer/demo.py)")
    p.add_argument("--policy-path", help="tiny-model weights (default builtin:tiny-sft, the shipped SFT model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo setting")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sft", help="train the tiny CPU model from scratch on procedural prompt -> grid data")
    p.add_argument("--out", type=Path, required=True, help="writes config.json, model.safetensors, loss.png")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="the grid's side in pixels (2x2 views)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prompts", help="mix in this prompt set (e.g. builtin:shapes-train); default: grammar only")
    p.add_argument("--checkpoint-every", type=int, default=500, help="save the weights every N steps (0: at the end)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("compare", help="curves of several runs in one figure (ablations), and their before/after")
    p.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR", help="run folders (with metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("compare-runs.png"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("prompts", help="list the shipped prompt sets, or print one")
    p.add_argument("name", nargs="?", help="e.g. builtin:shapes-train or a file")
    p.set_defaults(func=cmd_prompts)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MRCError as exc:
        print(f"carve3d-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carve3d-train: interrupted (the last checkpoint is kept; use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
