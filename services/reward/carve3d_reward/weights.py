"""Where model weights live, how they are fetched, verified and read.

Nothing here downloads anything unless asked to (:func:`fetch_lpips_trunk`, i.e.
``mrc weights fetch --lpips alex``); loading code only *finds* weights
(:func:`trunk_weights_path`) and raises :class:`WeightsMissingError` with the
command to run when they are absent.

LPIPS trunks are torchvision's ImageNet checkpoints. Their default location is
torch's own cache, ``$TORCH_HOME/hub/checkpoints/<filename>`` (what
``torch.hub.get_dir()`` says), so a machine that already has them from
torchvision or ``lpips`` reuses them. The 8 hex characters in a torchvision
filename are the start of the file's sha256 (the check ``torch.hub`` does); a
file found at the default location is always checked against them.

An explicit file (``lpips_trunk_path`` / ``MRC_LPIPS_TRUNK_PATH``) is checked
against ``lpips_trunk_sha256`` / ``MRC_LPIPS_TRUNK_SHA256`` when that is given;
without it the file is loaded as it is, without a warning: pinning a hash for a
file you supplied yourself is your choice. (This module reads no environment
variable itself; :class:`~carve3d_reward.settings.MetricSettings` does and
passes the values in.)

Every weights file (LPIPS trunks and linear layers, LRM checkpoints) is read by
:func:`read_state_dict`: safetensors, or ``torch.load(weights_only=True)``,
which unpickles tensors and plain data only and never runs code from the file;
and compared with the model it is for by :func:`mismatch_report`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import urllib.error
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from torch import Tensor

from .errors import ConfigError, WeightsMismatchError, WeightsMissingError

#: Seconds a download may wait on the network (connect or read) before failing.
DOWNLOAD_TIMEOUT_S: Final = 30.0
#: Shortest accepted sha256 prefix (torch.hub's filename convention uses 8).
MIN_HASH_PREFIX: Final = 8

_ZIP_MAGIC = b"PK\x03\x04"
_MAX_LISTED = 6  # keys named per category in a mismatch message
_HEX = re.compile(r"[0-9a-f]+")
_FILENAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torch.hub: "<name>-<sha256 prefix>.<ext>"


@dataclass(frozen=True)
class WeightsSpec:
    """One downloadable weights file."""

    url: str
    filename: str
    description: str = ""

    @property
    def hash_prefix(self) -> str:
        """The sha256 prefix encoded in :attr:`filename` (torch.hub convention)."""
        m = _FILENAME_HASH.search(self.filename)
        if m is None:  # a programming error in the table below, not a user error
            raise ValueError(f"{self.filename!r} carries no '-<sha256 prefix>.' part")
        return m.group(1)

    def default_path(self) -> Path:
        """``torch.hub.get_dir()/checkpoints/<filename>`` (honours ``TORCH_HOME`` and ``torch.hub.set_dir``)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename


#: torchvision's ImageNet trunks used by LPIPS (only their ``features.*`` part is used).
LPIPS_TRUNKS: dict[str, WeightsSpec] = {
    "alex": WeightsSpec(
        url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        filename="alexnet-owt-7be5be79.pth",
        description="torchvision AlexNet (IMAGENET1K_V1), the LPIPS trunk of the Carve3D paper (233 MB)",
    ),
    "vgg": WeightsSpec(
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        filename="vgg16-397923af.pth",
        description="torchvision VGG16 (IMAGENET1K_V1), the LPIPS-VGG trunk (528 MB)",
    ),
}

#: sha256 of the linear-layer weights shipped inside ``lpips==0.1.4`` (``lpips/weights/v0.1/<net>.pth``).
LPIPS_LINEAR_SHA256: dict[str, str] = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
}


def lpips_trunk_spec(net: str) -> WeightsSpec:
    """The :data:`LPIPS_TRUNKS` entry of ``net``; unknown -> :class:`ConfigError`."""
    try:
        return LPIPS_TRUNKS[net]
    except KeyError:
        raise ConfigError(f"unknown LPIPS trunk {net!r}; known: {', '.join(sorted(LPIPS_TRUNKS))}") from None


def fetch_command(net: str) -> str:
    """The CLI command that downloads ``net``'s trunk."""
    return f"mrc weights fetch --lpips {net}"


# -- hashing ---------------------------------------------------------------------------------------------------------
_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (never whole in memory).

    Results are memoised per (path, inode, size, mtime), so verifying the same
    unchanged file twice in one process costs one read.
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _SHA256_CACHE:
        return _SHA256_CACHE[key]
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    digest = h.hexdigest()
    _SHA256_CACHE[key] = digest
    return digest


def normalize_sha256(expected: str) -> str:
    """Lower-case, stripped hex sha256 or prefix of at least :data:`MIN_HASH_PREFIX` chars; else ConfigError."""
    e = expected.strip().lower()
    if not (MIN_HASH_PREFIX <= len(e) <= 64 and _HEX.fullmatch(e)):
        raise ConfigError(
            f"expected sha256 {expected!r} is not a hex digest or a hex prefix of {MIN_HASH_PREFIX} to 64 characters"
        )
    return e


def verify_sha256(path: str | os.PathLike[str], expected: str, *, hint: str = "") -> str:
    """Check that ``path``'s sha256 starts with ``expected`` (a full digest or a prefix of >= 8 hex chars).

    Returns the full digest. Mismatch -> :class:`WeightsMismatchError` naming
    the file, the expected and the actual hash (and ``hint``, what to do).
    """
    want = normalize_sha256(expected)
    actual = file_sha256(path)
    if not actual.startswith(want):
        msg = f"{path}: sha256 {actual} does not match the expected {want}"
        raise WeightsMismatchError(f"{msg}; {hint}" if hint else msg)
    return actual


# -- LPIPS trunks ----------------------------------------------------------------------------------------------------
def trunk_weights_path(
    net: str,
    path: str | os.PathLike[str] | None = None,
    *,
    sha256: str | None = None,
    verify: bool = True,
) -> Path:
    """The LPIPS trunk weights file of ``net`` ("alex" or "vgg"), checked.

    ``path=None``: the torch cache, ``Path(torch.hub.get_dir()) / "checkpoints" /
    filename``; the file must match the sha256 prefix in its name (and
    ``sha256`` too, if given). An explicit ``path`` is checked against
    ``sha256`` when given and loaded unchecked otherwise. ``verify=False`` only
    locates the file.

    Raises :class:`WeightsMissingError` (message: the command to fetch them and
    how to supply an offline copy) or :class:`WeightsMismatchError`.
    """
    spec = lpips_trunk_spec(net)
    expected = normalize_sha256(sha256) if sha256 is not None else None
    if path is None:
        p = spec.default_path()
        if not p.is_file():
            raise WeightsMissingError(
                f"LPIPS {net} trunk weights not found at {p}; run `{fetch_command(net)}` (needs internet once), "
                f"or without internet copy {spec.filename} into {p.parent} (TORCH_HOME moves that cache) "
                f"or point MRC_LPIPS_TRUNK_PATH at a copy"
            )
        if verify:
            hint = f"the file is corrupt or incomplete: delete it and run `{fetch_command(net)}`"
            verify_sha256(p, spec.hash_prefix, hint=hint)
            if expected is not None:
                verify_sha256(p, expected, hint="check MRC_LPIPS_TRUNK_SHA256")
        return p
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsMissingError(
            f"LPIPS {net} trunk weights file {p} (lpips_trunk_path / MRC_LPIPS_TRUNK_PATH) does not exist; "
            f"unset it to use the torch cache (`{fetch_command(net)}`) or copy {spec.filename} there"
        )
    if verify and expected is not None:
        verify_sha256(p, expected, hint=f"is it {spec.filename}? check MRC_LPIPS_TRUNK_SHA256")
    return p


def fetch_lpips_trunk(net: str, progress: bool = True) -> Path:
    """Download ``net``'s trunk into the torch cache (a no-op if a valid copy is there); returns its path.

    Uses ``torch.hub.download_url_to_file`` with the filename's hash prefix
    (it writes a ``.partial`` file and moves it into place only when complete
    and valid). The socket default timeout is set to :data:`DOWNLOAD_TIMEOUT_S`
    for the download so a dead network fails instead of hanging. Failures
    raise :class:`WeightsMissingError` (network) or :class:`WeightsMismatchError`
    (the downloaded bytes have the wrong hash), with a one-line message.
    """
    spec = lpips_trunk_spec(net)
    dst = spec.default_path()
    if dst.is_file():
        try:
            verify_sha256(dst, spec.hash_prefix)
            return dst
        except WeightsMismatchError:
            pass  # a corrupt copy: download again (replaced only once the new file is complete and valid)
    offline = (
        f"on a machine without internet, copy {spec.filename} (sha256 {spec.hash_prefix}...) to {dst} "
        f"or point MRC_LPIPS_TRUNK_PATH at a copy"
    )
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsMissingError(f"cannot create the weights cache {dst.parent}: {e}; set TORCH_HOME") from e
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(spec.url, str(dst), hash_prefix=spec.hash_prefix, progress=progress)
    except urllib.error.URLError as e:  # includes HTTPError
        reason = getattr(e, "reason", e)
        raise WeightsMissingError(f"could not download {spec.url}: {reason}; {offline}") from e
    except (TimeoutError, OSError) as e:
        raise WeightsMissingError(f"could not download {spec.url}: {e}; {offline}") from e
    except RuntimeError as e:  # torch.hub: 'invalid hash value (expected ..., got ...)'
        raise WeightsMismatchError(f"downloaded {spec.url} but {e}; retry, or {offline}") from e
    finally:
        socket.setdefaulttimeout(previous_timeout)
    if not dst.is_file():
        raise WeightsMissingError(f"could not download {spec.url}: no file was written; {offline}")
    verify_sha256(dst, spec.hash_prefix, hint=f"delete it and run `{fetch_command(net)}` again")
    return dst


# -- reading ---------------------------------------------------------------------------------------------------------
def _is_safetensors(head: bytes) -> bool:
    """safetensors: 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def read_state_dict(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, pickle_hint: str = ""
) -> dict[str, Tensor]:
    """The tensors stored in a weights file (a Lightning ``state_dict`` unwrapped), on CPU.

    The format is recognised from the file's first bytes, not its name.
    ``trust_pickle=True`` lets ``torch.load`` run arbitrary pickled code; only
    for files from a source you trust. Any failure is one
    :class:`WeightsMismatchError` naming the file; ``pickle_hint`` is added
    when ``weights_only`` loading refuses the file's Python objects.
    """
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(16)
    hint = f"the file is truncated or not a checkpoint: delete it and fetch it again ({p.stat().st_size} bytes)"
    if _is_safetensors(head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsMismatchError(f"{p}: cannot read safetensors ({e}); {hint}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about odd pickle protocols of garbage files: we raise
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=head.startswith(_ZIP_MAGIC))
        except pickle.UnpicklingError as e:
            if "weights only" in str(e).lower() or "weights_only" in str(e):
                raise WeightsMismatchError(
                    f"{p}: holds Python objects besides tensors, which weights_only loading refuses"
                    + (f"; {pickle_hint}" if pickle_hint else "")
                ) from None
            raise WeightsMismatchError(f"{p}: cannot unpickle ({e}); {hint}") from None
        except Exception as e:  # noqa: BLE001 - torch.load on a garbage file may raise anything (IndexError...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
            raise WeightsMismatchError(f"{p}: cannot read ({first}); {hint}") from None
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightsMismatchError(f"{p}: expected a state dict, found {type(raw).__name__}")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsMismatchError(f"{p}: contains no tensors")
    return tensors


def mismatch_report(expected: Mapping[str, Sequence[int]], found: Mapping[str, Tensor]) -> str:
    """'' if ``found`` has exactly ``expected``'s keys and shapes, else a one-line description."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shaped = [
        f"{k}: file {list(found[k].shape)}, model {list(expected[k])}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", shaped)):
        if items:
            shown = ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")
            parts.append(f"{len(items)} {label} ({shown})")
    return "; ".join(parts)
