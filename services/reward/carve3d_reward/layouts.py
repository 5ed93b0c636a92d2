"""Grid layouts: how views are tiled in one image and where their cameras are.

A layout is data, not code: adding one (say a 3x2 Zero123++-style grid) means
adding an entry to :data:`LAYOUTS`; the metric never looks at rows or columns
itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cameras import Cameras, look_at_c2w, orbit_positions
from .errors import ConfigError


@dataclass(frozen=True)
class GridLayout:
    """``rows x cols`` tiles in row-major order, each with its camera angles.

    Azimuths are relative to the grid's ``azimuth0``; angles in degrees.
    """

    name: str
    rows: int
    cols: int
    azimuths_deg: tuple[float, ...]
    elevations_deg: tuple[float, ...]

    def __post_init__(self) -> None:
        n = self.rows * self.cols
        if len(self.azimuths_deg) != n or len(self.elevations_deg) != n:
            raise ConfigError(
                f"layout {self.name!r}: {self.rows}x{self.cols} tiles need {n} azimuths and elevations, "
                f"got {len(self.azimuths_deg)} and {len(self.elevations_deg)}"
            )

    @property
    def num_views(self) -> int:
        return self.rows * self.cols

    def cameras(self, *, radius: float, fov_deg: float, azimuth0_deg: float = 0.0) -> Cameras:
        """The layout's cameras, looking at the origin from ``radius``."""
        az = torch.tensor(self.azimuths_deg, dtype=torch.float64) + azimuth0_deg
        el = torch.tensor(self.elevations_deg, dtype=torch.float64)
        return Cameras(look_at_c2w(orbit_positions(az, el, radius)), fov_deg)


#: Instant3D's 2x2 grid: elevation 20 deg, azimuths a0 + 0/90/180/270 in tile
#: order (top-left, top-right, bottom-left, bottom-right).
INSTANT3D_2X2 = GridLayout("2x2", 2, 2, (0.0, 90.0, 180.0, 270.0), (20.0, 20.0, 20.0, 20.0))

LAYOUTS: dict[str, GridLayout] = {INSTANT3D_2X2.name: INSTANT3D_2X2}


def get_layout(name: str) -> GridLayout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(f"unknown grid layout {name!r}; known: {', '.join(sorted(LAYOUTS))}") from None
