"""Finding, fetching, verifying and loading LRM weights.

Files this reads:

* the published InstantMesh checkpoints, PyTorch Lightning ``.ckpt`` files
  whose ``state_dict`` keys start with ``lrm_generator.``; they are read with
  ``torch.load(weights_only=True)``, which unpickles tensors, containers and
  plain numbers/strings only and never runs code from the file;
* ``.safetensors`` files of the bare state dict (what :func:`convert_checkpoint`
  and :func:`save_state_dict` write).

The format is recognised from the file's first bytes, not its name. After the
prefix is stripped, the keys and shapes are compared with the model's; any
difference is one :class:`WeightsMismatchError` that lists the missing,
unexpected and mis-shaped keys (and names the preset that would fit, if one
does), then the state dict is loaded with ``strict=True``.

Where weights come from (:func:`resolve_checkpoint`): an explicit file
(``MRC_LRM_CHECKPOINT``), else the Hugging Face cache, which
``mrc weights fetch --lrm <preset>`` fills (:func:`fetch_checkpoint`, via
``huggingface_hub.hf_hub_download``). Loading never downloads unless asked to
(``MRC_LRM_DOWNLOAD=1``). A published file is always checked against the
sha256 of its Hub LFS object.

If ``weights_only`` loading refuses a ``.ckpt`` (it holds Python objects other
than tensors and plain data), convert it once, from a file you trust, with
``python -m carve3d_reward.lrm.checkpoint SRC.ckpt DST.safetensors --trust-pickle``
and point ``MRC_LRM_CHECKPOINT`` at the result.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import weights
from ..errors import ConfigError, MRCError, WeightsMismatchError, WeightsMissingError
from ..weights import file_sha256, mismatch_report, verify_sha256
from .config import PRESETS, LRMConfig, get_preset
from .model import LRMGenerator, build_generator

#: Key prefix of the generator's weights inside the published Lightning checkpoints.
LIGHTNING_PREFIX = "lrm_generator."


def fetch_command(preset: str) -> str:
    """The CLI command that downloads ``preset``'s weights."""
    return f"mrc weights fetch --lrm {preset}"


# -- reading -----------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The generator's state dict stored in ``path`` (Lightning prefix stripped, on CPU).

    ``trust_pickle=True`` lets ``torch.load`` run arbitrary pickled code; only
    for files from a source you trust (see the module docstring).
    """
    p = Path(path)
    convert = (
        "if the file comes from a source you trust, convert it once with `python -m carve3d_reward.lrm.checkpoint "
        f"{p} {p.with_suffix('.safetensors')} --trust-pickle` and set MRC_LRM_CHECKPOINT to the result"
    )
    return extract_state_dict(weights.read_state_dict(p, trust_pickle=trust_pickle, pickle_hint=convert), source=str(p))


def extract_state_dict(raw: Mapping[str, Tensor], *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The generator's tensors of a state dict: a training checkpoint's ``lrm_generator.*`` keys, or all of them."""
    tensors = dict(raw)
    if any(k.startswith(LIGHTNING_PREFIX) for k in tensors):  # a training checkpoint: keep the generator only
        tensors = {k[len(LIGHTNING_PREFIX) :]: v for k, v in tensors.items() if k.startswith(LIGHTNING_PREFIX)}
    if not tensors:
        raise WeightsMismatchError(f"{source}: contains no generator tensors")
    return tensors


# -- checking and loading ---------------------------------------------------------------------------------------------
def expected_shapes(config: LRMConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of ``config``'s model with its shape (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_generator(config, device="meta").state_dict().items()}


def matching_presets(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Names of the presets whose key set and shapes ``state_dict`` has exactly."""
    return [name for name, cfg in PRESETS.items() if not mismatch_report(expected_shapes(cfg), state_dict)]


def load_into(model: LRMGenerator, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint") -> LRMGenerator:
    """Check ``state_dict`` against ``model`` (one clear error) and load it strictly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = mismatch_report(expected, state_dict)
    if report:
        fits = [n for n in matching_presets(state_dict) if n != model.config.name]
        hint = f"; it fits preset {fits[0]!r} (set MRC_LRM_PRESET / --lrm-preset)" if fits else ""
        raise WeightsMismatchError(f"{source} does not fit LRM preset {model.config.name!r}: {report}{hint}")
    meta = next(iter(model.parameters())).is_meta
    model.load_state_dict(dict(state_dict), strict=True, assign=meta)
    return model.float()


def load_generator(config: LRMConfig, path: str | os.PathLike[str], *, sha256: str | None = None) -> LRMGenerator:
    """A generator of ``config`` with the weights in ``path`` (checked against ``sha256`` when given), on CPU."""
    p = Path(path)
    if sha256 is not None:
        verify_sha256(p, sha256, hint="the file is corrupt, incomplete or a different checkpoint")
    state_dict = read_state_dict(p)
    model = build_generator(config, device="meta")  # no random init of 378M parameters just to overwrite them
    return load_into(model, state_dict, source=str(p)).eval()


# -- writing ----------------------------------------------------------------------------------------------------------
def save_state_dict(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a state dict: ``.safetensors`` bare, anything else as a Lightning-style ``.ckpt`` (prefixed)."""
    p = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(p))
    else:
        torch.save({"state_dict": {LIGHTNING_PREFIX + k: v for k, v in state.items()}}, p)
    return p


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, trust_pickle: bool = False) -> Path:
    """Rewrite ``src`` (any supported format) as a bare ``.safetensors`` state dict at ``dst``."""
    if Path(dst).suffix != ".safetensors":
        raise ConfigError(f"{dst}: the converted file must end in .safetensors")
    return save_state_dict(read_state_dict(src, trust_pickle=trust_pickle), dst)


# -- locating and fetching --------------------------------------------------------------------------------------------
def _missing_message(config: LRMConfig, cache_dir: str | os.PathLike[str] | None) -> str:
    hub = config.hub
    assert hub is not None
    try:
        from huggingface_hub import constants

        where = f"the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE})"
    except ImportError:
        where = "the Hugging Face cache (huggingface_hub is not installed: pip install huggingface_hub)"
    return (
        f"LRM weights for preset {config.name!r} ({hub.repo_id}/{hub.filename}, {hub.size_bytes / 1e9:.2f} GB, "
        f"{hub.license}) are not in {where}; run `{fetch_command(config.name)}` (needs internet once), or on a "
        f"machine without internet copy {hub.filename} (sha256 {hub.sha256[:12]}...) there or anywhere and set "
        f"MRC_LRM_CHECKPOINT to its path"
    )


def cached_checkpoint(config: LRMConfig, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The published file of ``config`` if it is in the Hugging Face cache (no network)."""
    if config.hub is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(config.hub.repo_id, config.hub.filename, cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def fetch_checkpoint(preset: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download ``preset``'s published weights into the Hugging Face cache (no-op when present); verify; return it."""
    config = get_preset(preset)
    hub = config.hub
    if hub is None:
        raise ConfigError(f"LRM preset {preset!r} has no published weights; known: {_published()}")
    offline = _missing_message(config, cache_dir)
    path = cached_checkpoint(config, cache_dir)
    if path is None:
        try:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError
        except ImportError:
            raise WeightsMissingError(
                f"fetching LRM weights needs huggingface_hub: pip install huggingface_hub; {offline}"
            ) from None
        try:
            path = Path(hf_hub_download(hub.repo_id, hub.filename, cache_dir=cache_dir))
        except (OSError, EntryNotFoundError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WeightsMissingError(f"could not download {hub.repo_id}/{hub.filename}: {first}; {offline}") from None
    verify_sha256(path, hub.sha256, hint=f"delete it from the cache and run `{fetch_command(preset)}` again")
    return path


def resolve_checkpoint(
    config: LRMConfig,
    path: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> tuple[Path, str | None]:
    """Where ``config``'s weights are, and the sha256 (or prefix) they must have (``None``: unchecked).

    An explicit ``path`` wins (checked against ``sha256`` when given);
    otherwise the published file in the Hugging Face cache, fetched first if
    ``download``. Absent -> :class:`WeightsMissingError` saying how to get it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsMissingError(
                f"LRM checkpoint {p} (lrm_checkpoint / MRC_LRM_CHECKPOINT) does not exist"
                + (f"; unset it to use the Hugging Face cache (`{fetch_command(config.name)}`)" if config.hub else "")
            )
        return p, sha256
    if config.hub is None:
        raise WeightsMissingError(
            f"LRM preset {config.name!r} has no published weights: set MRC_LRM_CHECKPOINT to a checkpoint of it, "
            f"or use a published preset ({_published()})"
        )
    found = cached_checkpoint(config, cache_dir)
    if found is None and download:
        found = fetch_checkpoint(config.name, cache_dir=cache_dir)
    if found is None:
        raise WeightsMissingError(_missing_message(config, cache_dir))
    return found, sha256 or config.hub.sha256


def _published() -> str:
    return ", ".join(name for name, c in PRESETS.items() if c.hub is not None)


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """Full sha256 of a checkpoint file (memoised per file version)."""
    return file_sha256(path)


# -- python -m carve3d_reward.lrm.checkpoint SRC DST ----------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m carve3d_reward.lrm.checkpoint",
        description="Convert an LRM checkpoint (Lightning .ckpt or state dict) to a bare .safetensors state dict.",
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow torch.load to run pickled code (only for a file from a source you trust)",
    )
    parser.add_argument("--preset", default=None, help="also check the result fits this preset")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst, trust_pickle=args.trust_pickle)
        if args.preset:
            load_generator(get_preset(args.preset), out)
    except MRCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (sha256 {file_sha256(out)[:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
