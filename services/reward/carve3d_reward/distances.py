"""Image distances between input-view crops and their re-rendered crops.

Every distance takes two float batches ``[N, 3, S, S]`` in ``[0, 1]`` and
returns ``float32 [N]``, one value per pair, lower is more similar, 0 for
identical images. The contract every implementation keeps:

* **float32**: inputs are cast to float32, autocast is switched off and, on
  CUDA, cuDNN convolutions run in full fp32 (no TF32) for the call; an LPIPS
  model whose parameters were cast to another dtype is refused.
* **deterministic**: no dropout (the module is pinned to eval mode, ``train()``
  is a no-op), cuDNN benchmark off and deterministic algorithms on for the call;
  two calls on the same inputs give the same bits. Building a distance does not
  move the global RNG.
* **no autograd**: computed under ``torch.no_grad()`` (not ``inference_mode``,
  so the result can still be used as a constant in a loss, e.g. ``logp * r``).
* **range**: inputs must be in ``[0, 1]``; values within one 8-bit level outside
  (resampling overshoot) are clamped, anything further is an error (``[-1, 1]``
  or ``[0, 255]`` inputs are caught, not silently scored). LPIPS rescales to
  ``[-1, 1]`` itself (torchmetrics' ``normalize=True``).

:attr:`Distance.worst` is the distance given to a view whose foreground is
empty (1.0 for all distances here). :attr:`Distance.fingerprint` identifies the
weights a distance uses ("" when it has none).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from . import weights as _weights
from .errors import ConfigError, WeightsMismatchError

#: Values this far outside [0, 1] (one 8-bit level) are clamped; further is an error.
RANGE_TOLERANCE = 1.0 / 255.0


@contextlib.contextmanager
def _strict_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA: cuDNN convs in IEEE fp32 (no TF32), deterministic, no benchmark; restored afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark)
    conv = getattr(cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")  # torch >= 2.9
    saved_precision = conv.fp32_precision if new_api else cudnn.allow_tf32
    cudnn.deterministic, cudnn.benchmark = True, False
    if new_api:
        conv.fp32_precision = "ieee"
    else:
        cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if new_api:
            conv.fp32_precision = saved_precision
        else:
            cudnn.allow_tf32 = saved_precision
        cudnn.deterministic, cudnn.benchmark = saved


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class Distance(torch.nn.Module):
    """Base class: ``forward(a, b) -> float32 [N]`` for ``a, b`` float ``[N, 3, S, S]`` in ``[0, 1]``.

    Subclasses implement :meth:`_distance` on validated float32 inputs already
    on :attr:`device`. The module is always in eval mode.
    """

    name: str = ""
    #: Distance assigned to a view with an empty foreground.
    worst: float = 1.0
    #: Minimum image side this distance accepts.
    min_size: int = 1

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        # Tracks the module's device through .to()/.cuda() (the distances without parameters have no other tensor).
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float32, device=device), persistent=False)
        self.fingerprint: str = ""
        self.eval()

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def train(self, mode: bool = True) -> Distance:
        """Distances are never trained: stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, device={self.device}"

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = self._prepare(a, b)
        if a.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        with torch.no_grad(), _no_autocast(self.device), _strict_fp32(self.device):
            d = self._distance(a, b)
        return d.reshape(a.shape[0]).to(torch.float32)

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def _prepare(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Check shapes, dtype and range; return float32 copies on :attr:`device`, clamped to [0, 1]."""
        for t, what in ((a, "a"), (b, "b")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{self.name}: {what} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != 4 or t.shape[1] != 3:
                raise ValueError(f"{self.name}: {what} must be [N, 3, H, W], got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(
                    f"{self.name}: {what} must be a float tensor in [0, 1], got {t.dtype} (uint8 images: divide by 255)"
                )
        if a.shape != b.shape:
            raise ValueError(f"{self.name}: a and b differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        if min(a.shape[-2:]) < self.min_size:
            raise ConfigError(
                f"{self.name} needs images of at least {self.min_size}x{self.min_size} pixels, "
                f"got {a.shape[-2]}x{a.shape[-1]}; use a larger view_size"
            )
        a = a.detach().to(self.device, torch.float32)
        b = b.detach().to(self.device, torch.float32)
        if a.numel():
            both = torch.stack([a.amin(), a.amax(), b.amin(), b.amax()]).tolist()
            lo, hi = min(both), max(both)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{self.name}: inputs contain NaN or inf")
            if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
                guess = " (they look like [-1, 1])" if lo < -0.5 else " (they look like [0, 255])" if hi > 2 else ""
                raise ValueError(f"{self.name}: inputs must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{guess}")
        return a.clamp(0.0, 1.0), b.clamp(0.0, 1.0)


class L1Distance(Distance):
    """Mean absolute difference per sample (over channels and pixels), in [0, 1]."""

    name = "l1"

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().flatten(1).mean(dim=1)


class SSIMDistance(Distance):
    """``(1 - SSIM) / 2`` per sample, in [0, 1] (``pytorch_msssim.ssim``, data range 1, gaussian window).

    SSIM uses an 11-pixel gaussian window (sigma 1.5) over valid positions only,
    so images must be at least ``win_size`` pixels on each side; smaller images
    raise :class:`ConfigError` rather than silently changing the window (which
    would change the metric; the metric's ``view_size`` is >= 16). Pass a
    smaller odd ``win_size`` explicitly if you want one.
    """

    name = "ssim"

    def __init__(self, device: str | torch.device = "cpu", *, win_size: int = 11, win_sigma: float = 1.5) -> None:
        super().__init__(device)
        if win_size < 3 or win_size % 2 == 0:
            raise ConfigError(f"ssim win_size must be odd and >= 3, got {win_size}")
        if win_sigma <= 0:
            raise ConfigError(f"ssim win_sigma must be > 0, got {win_sigma}")
        self.win_size = win_size
        self.win_sigma = float(win_sigma)
        self.min_size = win_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, win_size={self.win_size}, win_sigma={self.win_sigma}"

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        from pytorch_msssim import ssim

        s = ssim(a, b, data_range=1.0, size_average=False, win_size=self.win_size, win_sigma=self.win_sigma)
        return ((1.0 - s) / 2.0).clamp(0.0, 1.0)


# -- LPIPS -----------------------------------------------------------------------------------------------------------
LPIPSNet = Literal["alex", "vgg"]


def load_lpips_trunk(net_module: torch.nn.Module, state: Mapping[str, Tensor], *, source: str = "trunk") -> None:
    """Copy torchvision ``features.<k>.<param>`` tensors into lpips' ``slice<i>.<k>.<param>`` parameters.

    lpips' trunk is a set of ``slice1..slice5`` Sequentials whose children keep
    their torchvision feature index as name, so ``features.3.weight`` goes to
    ``slice2.3.weight`` (alex). Other top-level keys (``classifier.*``) are
    ignored. Every trunk parameter must be filled with a tensor of its shape,
    and every ``features.*`` key must be used; otherwise
    :class:`WeightsMismatchError` lists the missing / unexpected / misshapen keys.
    """
    targets: dict[str, Tensor] = {}
    for name, tensor in [*net_module.named_parameters(), *net_module.named_buffers()]:
        _slice, rest = name.split(".", 1)
        targets[f"features.{rest}"] = tensor
    provided = {k: v for k, v in state.items() if k.startswith("features.")}
    report = _weights.mismatch_report({k: tuple(t.shape) for k, t in targets.items()}, provided)
    if report:
        raise WeightsMismatchError(f"{source} does not fit the LPIPS trunk: {report}")
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(provided[k].to(t.dtype))


class LPIPSDistance(Distance):
    """LPIPS (``lpips==0.1.4``, v0.1 linear layers) with an AlexNet or VGG16 trunk, per sample.

    Built without any download: ``lpips.LPIPS(pretrained=True, pnet_rand=True)``
    loads the small linear layers shipped in the ``lpips`` package (checked
    against :data:`~carve3d_reward.weights.LPIPS_LINEAR_SHA256`) around a
    randomly initialised trunk, which is then filled from the torchvision
    checkpoint found by :func:`~carve3d_reward.weights.trunk_weights_path`
    (hash-checked, ``weights_only=True``). Inputs in ``[0, 1]`` are mapped to
    ``[-1, 1]`` (``normalize=True``), the paper's setting.
    """

    def __init__(
        self,
        net: LPIPSNet = "alex",
        *,
        trunk_path: str | Path | None = None,
        trunk_sha256: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device)
        if net not in ("alex", "vgg"):
            raise ConfigError(f"unknown LPIPS trunk {net!r}; known: alex, vgg")
        self.net: str = net
        self.name = f"lpips-{net}"
        # Smallest input the trunk's slices accept (alex: stride-4 conv + 2 max-pools; vgg: 4 max-pools).
        self.min_size = {"alex": 31, "vgg": 16}[net]

        # Find and check the trunk first: a missing file fails fast, before building anything.
        path = _weights.trunk_weights_path(net, trunk_path, sha256=trunk_sha256)
        trunk_digest = _weights.file_sha256(path)
        self.trunk_path = path

        model = self._build_lpips(net)
        load_lpips_trunk(model.net, _weights.read_state_dict(path), source=str(path))
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(device=self.device, dtype=torch.float32).eval()
        self.fingerprint = f"{net}-{trunk_digest[:8]}-{_weights.LPIPS_LINEAR_SHA256[net][:8]}"

    @staticmethod
    def _build_lpips(net: str) -> torch.nn.Module:
        import lpips

        # lpips 0.1.4 calls tv.alexnet(pretrained=False) / tv.vgg16(pretrained=False) for pnet_rand=True; torchvision
        # 0.29 still accepts it (legacy-interface shim, equivalent to weights=None) but warns: silence that here only.
        # fork_rng: the random trunk init must not move the caller's global RNG.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
            model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)

        # lpips loads the linear layers with strict=False: check the file and that every layer really got its weights.
        lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        _weights.verify_sha256(lin_file, _weights.LPIPS_LINEAR_SHA256[net], hint="reinstall lpips==0.1.4")
        lin_state = _weights.read_state_dict(lin_file)
        model_state = model.state_dict()
        want = {f"lin{i}.model.1.weight" for i in range(model.L)}
        if set(lin_state) != want or not all(torch.equal(model_state[k], lin_state[k]) for k in want):
            raise WeightsMismatchError(f"{lin_file}: the LPIPS linear layers were not loaded as expected")
        return model

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trunk={str(self.trunk_path)!r}, fingerprint={self.fingerprint!r}"

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        bad = [f"{n} is {p.dtype}" for n, p in self.model.named_parameters() if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"{self.name} must run in float32 (do not .half()/.to(dtype) it): {bad[0]}")
        return self.model(a, b, normalize=True)


# -- registry --------------------------------------------------------------------------------------------------------
def _lpips(net: LPIPSNet) -> Callable[..., Distance]:
    def make(*, device: str | torch.device, trunk_path: Path | None, trunk_sha256: str | None) -> Distance:
        return LPIPSDistance(net, trunk_path=trunk_path, trunk_sha256=trunk_sha256, device=device)

    return make


DISTANCES: dict[str, Callable[..., Distance]] = {
    "l1": lambda *, device, **_: L1Distance(device),
    "ssim": lambda *, device, **_: SSIMDistance(device),
    "lpips-alex": _lpips("alex"),
    "lpips-vgg": _lpips("vgg"),
}


def build_distance(
    name: str,
    *,
    device: str | torch.device = "cpu",
    trunk_path: str | Path | None = None,
    trunk_sha256: str | None = None,
) -> Distance:
    """The distance called ``name`` (see :data:`DISTANCES`); ``trunk_*`` only matter for LPIPS.

    Unknown name -> :class:`ConfigError` listing the known ones.
    """
    try:
        factory = DISTANCES[name]
    except KeyError:
        raise ConfigError(f"unknown distance {name!r}; known: {', '.join(DISTANCES)}") from None
    return factory(device=device, trunk_path=trunk_path, trunk_sha256=trunk_sha256)
