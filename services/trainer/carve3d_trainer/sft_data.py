"""Prompt -> procedural scene: the training data for the tiny model's supervised ("SFT") stage.

The shipped prompt sets (``shapes-train`` / ``shapes-test``) use a tiny grammar::

    prompt   := object [relation object]
    object   := ("a" | "an") [modifier] colour shape
    relation := "next to" | "on" | "and"

with the colours of :data:`COLOURS`, the shapes of :data:`SHAPES` and the
modifiers of :data:`MODIFIERS`. :func:`scene_from_prompt` parses such a prompt
into the matching primitives of :mod:`carve3d_reward.tools.synthetic` (a sphere is an
ellipsoid, a cube an equal-sided box, a box an elongated one), drawing the
details the prompt leaves open (exact size, rotation about the vertical axis,
texture kind and frequency, the second texture colour) from the seed. Parsing is
forgiving: unknown words are ignored, a shape without a colour gets a random
palette colour, words after the second shape are ignored, and **a prompt with no
recognised shape (including the empty prompt) gets one random object** (random
shape and colour), so every prompt maps to a non-empty scene.

:func:`random_prompt` writes prompts in the same grammar, so training covers
combinations beyond the shipped train list, and :func:`sft_batch` renders
prompts to 2x2 grids at the :data:`~carve3d_reward.layouts.INSTANT3D_2X2` cameras.
Everything is deterministic from integer seeds.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from carve3d_reward.grid import join_grid
from carve3d_reward.layouts import INSTANT3D_2X2
from carve3d_reward.tools.synthetic import BOX, CHECKER, CYLINDER, ELLIPSOID, RINGS, STRIPES, SceneBatch, render_scenes

#: Palette: saturated colours, none near white (the background).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "blue": (0.12, 0.25, 0.85),
    "green": (0.12, 0.65, 0.18),
    "yellow": (0.92, 0.80, 0.08),
    "purple": (0.55, 0.15, 0.70),
    "orange": (0.95, 0.50, 0.05),
}
#: Shape words -> primitive kind (see :data:`carve3d_reward.tools.synthetic.PRIMITIVE_KINDS`).
SHAPES: dict[str, int] = {"sphere": ELLIPSOID, "cube": BOX, "cylinder": CYLINDER, "box": BOX}
#: Modifiers: two textures and two proportions.
MODIFIERS = ("striped", "checkered", "tall", "flat")
#: Relations between two objects: the first word of each (``"next"`` is ``"next to"``).
RELATIONS = {"next": "next to", "on": "on", "and": "and"}
#: Camera placement of the grids (the trainer's and the reward's default).
CAMERA_RADIUS, CAMERA_FOV_DEG = 2.7, 50.0
#: The two primitive slots of every scene (the second is inactive for one object).
MAX_OBJECTS = 2

#: Largest world coordinate (per axis) of any object surface; the views see about +-1.2 at the origin.
_MAX_EXTENT = 1.0
_WORD = re.compile(r"[a-z]+")
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class ObjectSpec:
    """One parsed object: ``colour`` and ``shape`` are ``None`` where the prompt does not say."""

    colour: str | None
    shape: str | None
    modifiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptSpec:
    objects: tuple[ObjectSpec, ...]  # 1 or 2
    relation: str | None = None  # "next to", "on" or "and" (two objects only)


def parse_prompt(prompt: str) -> PromptSpec:
    """The objects and relation a prompt names (see the module docstring for the forgiving rules)."""
    objects: list[ObjectSpec] = []
    colour: str | None = None
    mods: list[str] = []
    relation: str | None = None
    for word in _WORD.findall(prompt.lower()):
        if len(objects) == MAX_OBJECTS:
            break
        if word in COLOURS:
            colour = word
        elif word in MODIFIERS:
            if word not in mods:
                mods.append(word)
        elif word in SHAPES:
            objects.append(ObjectSpec(colour, word, tuple(mods)))
            colour, mods = None, []
        elif word in RELATIONS and len(objects) == 1 and relation is None:
            relation = RELATIONS[word]
    if not objects:
        objects.append(ObjectSpec(colour, None, tuple(mods)))  # no shape: a random one (keeps a stray colour)
    if len(objects) == 2 and relation is None:
        relation = "and"
    return PromptSpec(tuple(objects), relation if len(objects) == 2 else None)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _random_object(rng: random.Random) -> str:
    words = []
    if rng.random() < 0.35:
        words.append(rng.choice(MODIFIERS))
    words += [rng.choice(sorted(COLOURS)), rng.choice(sorted(SHAPES))]
    return f"{_article(words[0])} {' '.join(words)}"


def random_prompt(rng: random.Random) -> str:
    """A prompt in the shipped grammar: one object (55%) or two with a relation, modifiers 35% of the time."""
    first = _random_object(rng)
    if rng.random() < 0.55:
        return first
    return f"{first} {rng.choice(sorted(RELATIONS.values()))} {_random_object(rng)}"


# --------------------------------------------------------------------------- scenes


def item_seed(seed: int, index: int) -> int:
    """Decorrelated per-item seed (SplitMix64 finaliser of ``(seed, index)``)."""
    h = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x243F6A8885A308D3) & ((1 << 64) - 1)
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (h ^ (h >> 31)) & _MASK63


def _rot_z(angle: float) -> list[list[float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]


def _half_extent(shape: str, mods: tuple[str, ...], size: float, rng: random.Random) -> list[float]:
    """Local half-extents ``(x, y, z)`` of one object of nominal ``size``."""
    if shape == "sphere":
        ext = [size, size, size]
    elif shape == "cube":
        ext = [size * 0.8] * 3
    elif shape == "box":  # elongated: one long side, one short height
        ext = [size * rng.uniform(1.05, 1.25), size * rng.uniform(0.55, 0.7), size * rng.uniform(0.5, 0.7)]
    else:  # cylinder
        ext = [size * 0.75, size * 0.75, size]
    if "tall" in mods:
        ext = [ext[0] * 0.8, ext[1] * 0.8, ext[2] * 1.5]
    if "flat" in mods:
        ext = [ext[0] * 1.15, ext[1] * 1.15, ext[2] * 0.4]
    return ext


def _bound(shape: str, ext: list[float], angle: float) -> tuple[float, float, float]:
    """Axis-aligned world half-extents after rotating by ``angle`` about z (round shapes are symmetric)."""
    if shape in ("sphere", "cylinder"):
        r = max(ext[0], ext[1])
        return r, r, ext[2]
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    return ext[0] * c + ext[1] * s, ext[0] * s + ext[1] * c, ext[2]


def scene_from_prompt(prompt: str, seed: int) -> SceneBatch:
    """A one-scene :class:`SceneBatch` (two primitive slots) matching ``prompt``, details drawn from ``seed``.

    One object sits at the origin; ``"X next to Y"`` puts X left (-x) and Y right
    (+x) of the origin, ``"X on Y"`` stacks X on top of Y (+z), and ``"X and Y"``
    puts them side by side along a random horizontal direction. Objects rest on a
    common floor for ``next to``/``and`` and everything stays within the camera's view.
    """
    rng = random.Random(seed)
    spec = parse_prompt(prompt)
    two = len(spec.objects) == 2
    placed = []
    for obj in spec.objects:
        colour = obj.colour or rng.choice(sorted(COLOURS))
        shape = obj.shape or rng.choice(sorted(SHAPES))
        size = rng.uniform(0.4, 0.48) if two else rng.uniform(0.6, 0.72)
        ext = _half_extent(shape, obj.modifiers, size, rng)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        if "striped" in obj.modifiers:
            texture = STRIPES
        elif "checkered" in obj.modifiers:
            texture = CHECKER
        else:
            texture = rng.choice((STRIPES, CHECKER, RINGS))
        base = torch.tensor(COLOURS[colour])
        if "striped" in obj.modifiers or "checkered" in obj.modifiers:  # a clearly different second colour
            other = rng.choice(sorted(c for c in COLOURS if c != colour))
            second = torch.tensor(COLOURS[other])
            frequency = rng.uniform(1.2, 2.0)
        else:  # a subtle darker shade: the object reads as its colour
            second = base * rng.uniform(0.7, 0.85)
            frequency = rng.uniform(1.0, 3.0)
        placed.append((shape, ext, angle, texture, base, second, frequency))

    centres: list[list[float]] = []
    bounds = [_bound(p[0], p[1], p[2]) for p in placed]
    if not two:
        centres.append([0.0, 0.0, 0.0])
    elif spec.relation == "on":  # the first object on top of the second, the pair centred vertically
        top, bottom = bounds
        height = top[2] * 2 + bottom[2] * 2
        z_bottom = -height / 2 + bottom[2]
        jitter = rng.uniform(-0.05, 0.05)
        centres += [[jitter, 0.0, z_bottom + bottom[2] + top[2]], [0.0, 0.0, z_bottom]]
    else:
        gap = rng.uniform(0.06, 0.14)
        if spec.relation == "next to":
            direction = (1.0, 0.0)
        else:
            phi = rng.uniform(0.0, 2.0 * math.pi)
            direction = (math.cos(phi), math.sin(phi))
        # extent of each object along the direction (conservative: the larger horizontal half-extent)
        a, b = max(bounds[0][0], bounds[0][1]), max(bounds[1][0], bounds[1][1])
        span = a + b + gap
        floor = -max(bounds[0][2], bounds[1][2])
        left, right = (a - b - span) / 2, (a - b + span) / 2  # the pair's extent is centred on the origin
        centres += [
            [left * direction[0], left * direction[1], floor + bounds[0][2]],
            [right * direction[0], right * direction[1], floor + bounds[1][2]],
        ]

    # Keep every object inside the view: shrink the whole layout if any extent passes _MAX_EXTENT.
    extent = max(abs(c[j]) + bd[j] for c, bd in zip(centres, bounds, strict=True) for j in range(3))
    shrink = min(1.0, _MAX_EXTENT / extent)
    centres = [[v * shrink for v in c] for c in centres]
    placed = [(p[0], [v * shrink for v in p[1]], *p[2:]) for p in placed]

    k = MAX_OBJECTS
    kind = torch.zeros(1, k, dtype=torch.int64)
    active = torch.zeros(1, k, dtype=torch.bool)
    rotation = torch.eye(3).repeat(1, k, 1, 1)
    scale = torch.ones(1, k, 3)
    translation = torch.zeros(1, k, 3)
    colour_a = torch.zeros(1, k, 3)
    colour_b = torch.zeros(1, k, 3)
    texture = torch.zeros(1, k, dtype=torch.int64)
    frequency = torch.ones(1, k)
    for i, ((shape, ext, angle, tex, base, second, freq), centre) in enumerate(zip(placed, centres, strict=True)):
        kind[0, i] = SHAPES[shape]
        active[0, i] = True
        rotation[0, i] = torch.tensor(_rot_z(angle))
        scale[0, i] = torch.tensor(ext)
        translation[0, i] = torch.tensor(centre)
        colour_a[0, i], colour_b[0, i] = base, second
        texture[0, i], frequency[0, i] = tex, freq
    return SceneBatch.from_placements(
        kind, rotation, scale, translation, colour_a, colour_b, texture, frequency, active
    )


def scenes_from_prompts(prompts: Sequence[str], seed: int) -> SceneBatch:
    """One scene per prompt; scene ``i`` depends only on ``(prompts[i], seed, i)``."""
    scenes = [scene_from_prompt(p, item_seed(seed, i)) for i, p in enumerate(prompts)]
    fields = ("kind", "active", "world_to_local", "colour_a", "colour_b", "texture", "frequency")
    return SceneBatch(**{f: torch.cat([getattr(s, f) for s in scenes]) for f in fields})


def sft_batch(prompts: Sequence[str], seed: int, view_size: int) -> Tensor:
    """2x2 grids ``[B, 3, 2 * view_size, 2 * view_size]`` in ``[0, 1]`` (white background) for ``prompts``."""
    if not prompts:
        raise ValueError("sft_batch needs at least one prompt")
    cams = INSTANT3D_2X2.cameras(radius=CAMERA_RADIUS, fov_deg=CAMERA_FOV_DEG)
    views = render_scenes(scenes_from_prompts(prompts, seed), cams, view_size)
    return join_grid(views, INSTANT3D_2X2)
