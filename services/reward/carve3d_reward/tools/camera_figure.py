"""The picture that proves the camera convention of :mod:`carve3d_reward.cameras`.

:func:`write_camera_figure` draws one PNG with two panels:

* (a) the world seen from above (plus a small side view for the elevation):
  the +x/+y axes (+z points out of the page), the four camera centres of the
  2x2 layout with their tile names and azimuths, and for each camera its
  viewing direction and its image-right direction;
* (b) the 2x2 views that :func:`~carve3d_reward.tools.synthetic.render_scenes`
  actually produces for :func:`axis_marker_scene` (a grey ball on the origin
  with coloured markers on the axes), each tile captioned with what the
  convention predicts it must show (e.g. tile 0 looks from +x: red +x in front,
  green +y on the image RIGHT, blue +z on top).

The predictions in the captions are derived from the convention's formulas
(camera centre and image-right vector), the pixels from the renderer; the
figure is the proof that the two agree. ``tests/test_camera_figure.py``
checks the same thing numerically on the same scene.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..cameras import Cameras
from ..layouts import INSTANT3D_2X2, GridLayout
from .synthetic import BOX, CYLINDER, ELLIPSOID, STRIPES, SceneBatch, render_scenes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.patches import Rectangle

#: Names of the 2x2 tiles in row-major order.
TILE_NAMES = ("TL", "TR", "BL", "BR")


@dataclass(frozen=True)
class AxisMarker:
    """A coloured primitive on a world axis of :func:`axis_marker_scene`."""

    label: str  # the axis it marks, e.g. "+x"
    colour_name: str
    rgb: tuple[float, float, float]
    position: tuple[float, float, float]
    kind: int  # primitive kind code (synthetic.ELLIPSOID, BOX, CYLINDER)
    scale: tuple[float, float, float]


#: The markers of :func:`axis_marker_scene`; there is deliberately none on -y and -z.
AXIS_MARKERS: tuple[AxisMarker, ...] = (
    AxisMarker("+x", "red", (0.90, 0.10, 0.08), (0.8, 0.0, 0.0), BOX, (0.15, 0.15, 0.15)),
    AxisMarker("+y", "green", (0.10, 0.72, 0.18), (0.0, 0.8, 0.0), ELLIPSOID, (0.18, 0.18, 0.18)),
    AxisMarker("+z", "blue", (0.12, 0.28, 0.95), (0.0, 0.0, 0.72), CYLINDER, (0.2, 0.2, 0.08)),
    AxisMarker("-x", "yellow", (0.95, 0.80, 0.05), (-0.8, 0.0, 0.0), ELLIPSOID, (0.13, 0.13, 0.13)),
)
#: Colour of the neutral centre ball and of the rods joining it to the markers.
CENTRE_GREY = (0.62, 0.62, 0.62)
ROD_GREY = (0.38, 0.38, 0.38)
CENTRE_RADIUS = 0.3
_ROD_RADIUS = 0.035


def axis_marker_scene() -> SceneBatch:
    """A batch of one scene: a grey ball at the origin plus :data:`AXIS_MARKERS` joined to it by grey rods.

    Red box at +x, green ball at +y, blue disc on top (+z), small yellow ball at
    -x, nothing at -y. Colours are flat (both texture colours equal), so a
    marker is recognised by its hue in any view.
    """
    rows: list[tuple[int, tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]] = [
        (ELLIPSOID, (CENTRE_RADIUS,) * 3, (0.0, 0.0, 0.0), CENTRE_GREY),
        # rods: cylinders along local z, turned onto x / y by the rotations below
        (CYLINDER, (_ROD_RADIUS, _ROD_RADIUS, 0.8), (0.0, 0.0, 0.0), ROD_GREY),  # x rod, -0.8..0.8
        (CYLINDER, (_ROD_RADIUS, _ROD_RADIUS, 0.4), (0.0, 0.4, 0.0), ROD_GREY),  # y rod, 0..0.8
        (CYLINDER, (_ROD_RADIUS, _ROD_RADIUS, 0.33), (0.0, 0.0, 0.33), ROD_GREY),  # z rod, 0..0.66
    ]
    rows += [(m.kind, m.scale, m.position, m.rgb) for m in AXIS_MARKERS]
    k = len(rows)
    rotation = torch.eye(3).repeat(k, 1, 1)
    rotation[1] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # local z -> world x
    rotation[2] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # local z -> world y
    colour = torch.tensor([r[3] for r in rows])
    return SceneBatch.from_placements(
        kind=torch.tensor([r[0] for r in rows])[None],
        rotation=rotation[None],
        scale=torch.tensor([r[1] for r in rows])[None],
        translation=torch.tensor([r[2] for r in rows])[None],
        colour_a=colour[None],
        colour_b=colour[None],
        texture=torch.full((1, k), STRIPES),
        frequency=torch.ones(1, k),
    )


def render_axis_markers(
    *,
    radius: float = 2.7,
    fov_deg: float = 50.0,
    azimuth0_deg: float = 0.0,
    view_size: int = 160,
    layout: GridLayout = INSTANT3D_2X2,
) -> tuple[Tensor, Cameras]:
    """Views ``[V, 3, S, S]`` of :func:`axis_marker_scene` from ``layout``'s cameras, and those cameras."""
    cams = layout.cameras(radius=radius, fov_deg=fov_deg, azimuth0_deg=azimuth0_deg)
    return render_scenes(axis_marker_scene(), cams, view_size)[0], cams


# --------------------------------------------------------------------------- predictions


def _axis_name(vec: np.ndarray) -> str:
    """``"+x"`` etc. when ``vec`` (horizontal) is within 1 degree of an axis, else its azimuth."""
    az = math.degrees(math.atan2(vec[1], vec[0])) % 360.0
    for angle, name in ((0.0, "+x"), (90.0, "+y"), (180.0, "-x"), (270.0, "-y"), (360.0, "+x")):
        if abs(az - angle) < 1.0:
            return name
    return f"azimuth {az:.0f}°"


def expected_sides(cams: Cameras) -> list[dict[str, str]]:
    """Where the convention puts each marker in each view: ``[{label: "front"|"right"|...}]``.

    Derived from the cameras alone (centre and image-right column of ``c2w``),
    never from pixels: the horizontal markers are classified by the sign of
    their offset along the camera's image-right and towards-camera directions.
    """
    out = []
    for c2w in cams.c2w.double().numpy():
        right, back = c2w[:3, 0], c2w[:3, 3] / np.linalg.norm(c2w[:3, 3])
        sides: dict[str, str] = {}
        for m in AXIS_MARKERS:
            p = np.asarray(m.position)
            if abs(p[2]) > 0:
                sides[m.label] = "top" if p[2] > 0 else "bottom"
                continue
            r, f = float(p @ right) / np.linalg.norm(p), float(p[:2] @ back[:2]) / np.linalg.norm(p)
            parts = []
            if f > 0.35:
                parts.append("front")
            elif f < -0.35:
                parts.append("behind")
            if r > 0.35:
                parts.append("RIGHT")
            elif r < -0.35:
                parts.append("LEFT")
            sides[m.label] = "-".join(parts)
        out.append(sides)
    return out


# --------------------------------------------------------------------------- the figure


def _draw_top_down(ax: Axes, cams: Cameras, layout: GridLayout, azimuth0_deg: float, radius: float) -> None:
    from matplotlib.patches import Arc, Circle, Wedge

    centres = cams.centers.double().numpy()
    c2w = cams.c2w.double().numpy()
    lim = radius + 1.4
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.grid(True, color="0.92", lw=0.6)
    ax.set_xlabel("world x")
    ax.set_ylabel("world y")
    ax.set_title("(a) world seen from above (+z points out of the page, towards you)", fontsize=11)

    # world axes
    ax.annotate("", xy=(1.3, 0), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "lw": 1.6, "color": "k"})
    ax.annotate("", xy=(0, 1.3), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "lw": 1.6, "color": "k"})
    ax.text(1.3, -0.1, "+x", fontsize=13, fontweight="bold", va="top", ha="center")
    ax.text(-0.1, 1.3, "+y", fontsize=13, fontweight="bold", ha="right", va="center")
    ax.plot([-1.3, 0], [0, 0], color="0.6", lw=1, ls=":")
    ax.plot([0, 0], [-1.3, 0], color="0.6", lw=1, ls=":")
    ax.text(-1.3, -0.1, "-x", fontsize=10, color="0.4", ha="center", va="top")
    ax.text(0.1, -1.3, "-y (no marker)", fontsize=9, color="0.4", va="center")

    # the marker scene, from above (+z marker drawn last: it sits on top)
    ax.add_patch(Circle((0, 0), CENTRE_RADIUS, facecolor=CENTRE_GREY, edgecolor="0.3", lw=0.8, zorder=3))
    for m in sorted(AXIS_MARKERS, key=lambda mk: mk.position[2]):
        x, y, _ = m.position
        ax.add_patch(Circle((x, y), max(m.scale[:2]), facecolor=m.rgb, edgecolor="0.2", lw=0.8, zorder=4))
    ax.text(0.0, 0.0, "+z", ha="center", va="center", fontsize=8, color="white", fontweight="bold", zorder=5)
    ax.text(0.8, 0.22, "red box +x", fontsize=8, color="0.15", ha="center", zorder=5)
    ax.text(0.24, 0.8, "green ball +y", fontsize=8, color="0.15", va="center", zorder=5)
    ax.text(-0.8, 0.2, "yellow ball -x", fontsize=8, color="0.15", ha="center", zorder=5)
    ax.text(0.12, -0.42, "blue disc +z: above the grey ball", fontsize=8, color="0.15", zorder=5)

    # orbit (the cameras' circle projected onto the ground plane) and the azimuth direction
    ring = float(np.linalg.norm(centres[0, :2]))
    ax.add_patch(Circle((0, 0), ring, fill=False, ls="--", color="0.55", lw=0.9))
    # azimuth is measured from +x, counter-clockwise seen from above
    ax.add_patch(Arc((0, 0), 2 * 1.9, 2 * 1.9, theta1=0, theta2=70, color="tab:purple", lw=1.3))
    ax.annotate(
        "", xy=(1.9 * math.cos(math.radians(72)), 1.9 * math.sin(math.radians(72))),
        xytext=(1.9 * math.cos(math.radians(66)), 1.9 * math.sin(math.radians(66))),
        arrowprops={"arrowstyle": "-|>", "color": "tab:purple", "lw": 1.3},
    )  # fmt: skip
    ax.text(
        2.1 * math.cos(math.radians(50)), 2.1 * math.sin(math.radians(50)),
        "azimuth: from +x,\ncounter-clockwise\n(+x towards +y)", color="tab:purple", fontsize=8, va="center",
    )  # fmt: skip

    half_fov = cams.fov_deg / 2
    for i, (c, m) in enumerate(zip(centres, c2w, strict=True)):
        x, y = c[0], c[1]
        az = layout.azimuths_deg[i] + azimuth0_deg
        look = math.degrees(math.atan2(-y, -x))
        ax.add_patch(
            Wedge((x, y), 0.32, look - half_fov, look + half_fov, facecolor="0.88", edgecolor="0.5", lw=0.7, zorder=6)
        )
        ax.plot([x], [y], "o", color="k", ms=5, zorder=7)
        fwd = -m[:2, 2] / max(np.linalg.norm(m[:2, 2]), 1e-9)
        right = m[:2, 0] / max(np.linalg.norm(m[:2, 0]), 1e-9)
        ax.annotate(
            "", xy=(x + 0.9 * fwd[0], y + 0.9 * fwd[1]), xytext=(x, y),
            arrowprops={"arrowstyle": "-|>", "color": "k", "lw": 1.8}, zorder=8,
        )  # fmt: skip
        ax.annotate(
            "", xy=(x + 0.75 * right[0], y + 0.75 * right[1]), xytext=(x, y),
            arrowprops={"arrowstyle": "-|>", "color": "tab:orange", "lw": 2.0}, zorder=8,
        )  # fmt: skip
        ax.text(
            x + 0.98 * right[0], y + 0.98 * right[1], "right",
            color="tab:orange", fontsize=8, ha="center", va="center", zorder=9,
        )  # fmt: skip
        out = np.array([x, y]) / max(math.hypot(x, y), 1e-9)
        name = TILE_NAMES[i] if layout.num_views == 4 else f"view {i}"
        ax.text(
            x + 0.55 * out[0], y + 0.55 * out[1], f"{name} / {i}\naz {az % 360:.0f}°",
            ha="center", va="center", fontsize=10, fontweight="bold", zorder=9,
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "edgecolor": "0.5", "alpha": 0.9},
        )  # fmt: skip

    ax.plot([], [], color="k", lw=1.8, label="viewing direction\n(camera -z, towards the origin)")
    ax.plot([], [], color="tab:orange", lw=2.0, label="image right\n(camera +x = c2w[:3, 0])")
    ax.plot([], [], "o", color="k", ms=5, label=f"camera centre\n(horizontal distance {ring:.2f})")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.95)


def _draw_side_view(ax: Axes, cams: Cameras, radius: float, elevation_deg: float) -> None:
    from matplotlib.patches import Arc, Circle

    el = math.radians(elevation_deg)
    cx, cz = radius * math.cos(el), radius * math.sin(el)
    ax.set_aspect("equal")
    ax.set_xlim(-1.2, radius + 0.9)
    ax.set_ylim(-0.9, max(cz, 0.9) + 0.5)
    ax.set_title("side view: elevation and radius (tile 0)", fontsize=10)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.annotate("", xy=(0, 1.1), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "lw": 1.4, "color": "k"})
    ax.text(0.07, 1.1, "+z (up)", fontsize=9, va="center")
    ax.text(radius + 0.85, -0.12, "horizontal", fontsize=8, ha="right", va="top", color="0.4")
    ax.add_patch(Circle((0, 0), CENTRE_RADIUS, facecolor=CENTRE_GREY, edgecolor="0.3", lw=0.8))
    top = next(m for m in AXIS_MARKERS if m.label == "+z")
    ax.add_patch(_rect(-top.scale[0], top.position[2] - top.scale[2], 2 * top.scale[0], 2 * top.scale[2], top.rgb))
    ax.plot([0, cx], [0, cz], color="k", lw=1.0, ls="--")
    ax.plot([cx], [cz], "o", color="k", ms=6)
    ax.add_patch(Arc((0, 0), 1.8, 1.8, theta1=0, theta2=elevation_deg, color="tab:purple", lw=1.3))
    ax.text(1.0, 0.5 * math.sin(el / 2) + 0.05, f"elevation {elevation_deg:g}°", color="tab:purple", fontsize=9)
    ax.text(
        0.6 * cx - 0.15 * math.sin(el), 0.6 * cz + 0.15 * math.cos(el), f"radius {radius:g}",
        fontsize=9, rotation=elevation_deg, ha="center", va="bottom", rotation_mode="anchor",
    )  # fmt: skip
    half = math.radians(cams.fov_deg / 2)
    for s in (-1, 1):
        ang = math.pi + el + s * half
        ax.plot([cx, cx + 1.2 * math.cos(ang)], [cz, cz + 1.2 * math.sin(ang)], color="0.7", lw=0.8)
    ax.text(cx, cz + 0.2, f"fov {cams.fov_deg:g}°", fontsize=8, ha="center", color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])


def _rect(x: float, y: float, w: float, h: float, colour: tuple[float, float, float]) -> Rectangle:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=colour, edgecolor="0.2", lw=0.8)


def _caption(sides: dict[str, str]) -> str:
    names = {m.label: m.colour_name for m in AXIS_MARKERS}
    horizontal = [f"{names[k]} {k}: {v}" for k, v in sides.items() if v not in ("top", "bottom")]
    top = [f"{names[k]} {k}: {v}" for k, v in sides.items() if v in ("top", "bottom")]
    return "expected: " + ", ".join(horizontal[:2]) + "\n" + ", ".join(horizontal[2:] + top)


def write_camera_figure(
    path: Path,
    *,
    radius: float = 2.7,
    fov_deg: float = 50.0,
    azimuth0_deg: float = 0.0,
    view_size: int = 160,
) -> Path:
    """Write the camera-convention figure (PNG) for the Instant3D 2x2 layout to ``path``; returns ``path``.

    Left: the world from above with the four cameras (tile name, azimuth,
    viewing and image-right directions) and a side view for the elevation.
    Right: the 2x2 views of :func:`axis_marker_scene` rendered by
    :func:`~carve3d_reward.tools.synthetic.render_scenes`, each captioned with what
    the convention predicts (see :func:`expected_sides`).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = INSTANT3D_2X2
    path = Path(path)
    views, cams = render_axis_markers(
        radius=radius, fov_deg=fov_deg, azimuth0_deg=azimuth0_deg, view_size=view_size, layout=layout
    )
    images = views.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    sides = expected_sides(cams)
    elevation = layout.elevations_deg[0]

    fig = Figure(figsize=(17.5, 10.2), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(
        f"Camera convention of the 2x2 (Instant3D) layout — radius {radius:g}, fov {fov_deg:g}°, "
        f"elevation {elevation:g}°, azimuth0 {azimuth0_deg:g}°; world z up, OpenGL c2w, u right / v down",
        fontsize=13, fontweight="bold", y=0.985,
    )  # fmt: skip
    outer = fig.add_gridspec(1, 2, width_ratios=(1.0, 1.08), left=0.04, right=0.99, top=0.87, bottom=0.075, wspace=0.1)
    left = outer[0].subgridspec(2, 1, height_ratios=(3.2, 1.0), hspace=0.22)
    _draw_top_down(fig.add_subplot(left[0]), cams, layout, azimuth0_deg, radius)
    _draw_side_view(fig.add_subplot(left[1]), cams, radius, elevation)

    right = outer[1].subgridspec(2, 2, hspace=0.45, wspace=0.08)
    s = view_size
    for i in range(layout.num_views):
        ax = fig.add_subplot(right[i // layout.cols, i % layout.cols])
        ax.imshow(images[i], extent=(0, s, s, 0), interpolation="nearest")
        ax.axhline(s / 2, color="0.75", lw=0.6, ls=":")
        ax.axvline(s / 2, color="0.75", lw=0.6, ls=":")
        ax.set_xticks([0, s // 2, s])
        ax.set_yticks([0, s // 2, s])
        ax.tick_params(labelsize=7)
        az = (layout.azimuths_deg[i] + azimuth0_deg) % 360
        eye = cams.centers[i].double().numpy()
        name = TILE_NAMES[i] if layout.num_views == 4 else f"view {i}"
        ax.set_title(
            f"tile {name} / {i}: azimuth {az:g}°, elevation {layout.elevations_deg[i]:g}°\n"
            f"camera looks from {_axis_name(eye)}",
            fontsize=10, fontweight="bold",
        )  # fmt: skip
        ax.set_xlabel(_caption(sides[i]), fontsize=9)
        if i == 0:
            o, e = s * 0.05, s * 0.25
            ax.annotate("", xy=(e, o), xytext=(o, o), arrowprops={"arrowstyle": "-|>", "lw": 1.0})
            ax.annotate("", xy=(o, e), xytext=(o, o), arrowprops={"arrowstyle": "-|>", "lw": 1.0})
            ax.text(e + 2, o, "u", fontsize=9, va="center")
            ax.text(o, e + 2, "v", fontsize=9, ha="center", va="top")
    fig.text(
        0.755, 0.93, "(b) the 2x2 grid as rendered by synthetic.render_scenes (tiles in grid order, pixels u, v)",
        ha="center", fontsize=11,
    )  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
