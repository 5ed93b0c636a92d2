"""Multi-grid requests whose envelope is valid but some grids are not: each bad grid alone is ``invalid``.

This is where one bad grid used to fail a whole batch (a premultiplied-alpha
TIFF, a boolean shape): every kind of bad grid is sent in each of the three
batch encodings next to good grids, which must still be scored. And the
request's pixel budget: grids that are each allowed but together exceed
``max_request_pixels`` refuse the request (413) before any is decoded.
"""

from __future__ import annotations

import json
import random

import numpy as np
from PIL import Image

from carve3d_reward.service.responses import to_jsonable

from .encoders import GRIDS, MAX_PIXELS, MAX_REQUEST_PIXELS, MULTIPART, Corpus, encode, multipart, pack
from .images import refused_formats


def add_batch_cases(corpus: Corpus, rng: random.Random, grids: np.ndarray) -> None:
    add = corpus.add
    corrupt = [c.body for c in corpus.cases if c.category in ("png_truncated", "jpeg_bitflip", "odd_size", "bomb")]
    corrupt = [b for b in corrupt if 0 < len(b) < 200_000]
    refused = list(refused_formats(grids[3]).values())
    good_png = encode(grids[5], "PNG")

    def all_encodings(name: str, blobs: list[bytes], statuses: tuple[str, ...]) -> None:
        entries = [{"image": b} for b in blobs]
        add(
            "grids_invalid",
            f"msgpack_{name}",
            pack({"grids": entries}),
            "application/msgpack",
            expect=GRIDS,
            statuses=statuses,
        )
        body = multipart([("grid", f"{j}.img", b) for j, b in enumerate(blobs)])
        add("grids_invalid", f"multipart_{name}", body, MULTIPART, expect=GRIDS, statuses=statuses)
        body = json.dumps(to_jsonable({"grids": entries})).encode()
        add(
            "grids_invalid",
            f"json_{name}",
            body,
            "application/json",
            expect=GRIDS,
            statuses=statuses,
            accept="application/json",
        )

    for i in range(8):
        picks = rng.sample(corrupt, rng.randint(1, 4))
        all_encodings(f"corrupt_{i}", picks, ("invalid",) * len(picks))
    for i, blob in enumerate(refused):  # the La TIFF among them: only its own grid fails
        all_encodings(f"refused_format_{i}_between_good", [good_png, blob, good_png], ("scored", "invalid", "scored"))
    add(
        "grids_invalid",
        "multipart_empty_file",
        multipart([("grid", "e.png", b"")]),
        MULTIPART,
        expect=GRIDS,
        statuses=("invalid",),
    )
    mixed = [
        {"image": corrupt[0]},
        {"data": grids[2].tobytes(), "shape": [128, 128, 3]},
        {"data": bytes(3), "shape": [1, 1, 3]},
    ]
    add(
        "grids_invalid",
        "msgpack_mixed_good_and_bad",
        pack({"grids": mixed}),
        "application/msgpack",
        expect=GRIDS,
        statuses=("invalid", "scored", "invalid"),
    )

    # the request's pixel budget, counted from headers before decoding
    side = int(MAX_PIXELS**0.5)
    white = encode(Image.new("RGB", (side, side), "white"), "PNG")  # each at max_pixels, a few kB
    fits = MAX_REQUEST_PIXELS // MAX_PIXELS
    add(
        "request_pixels",
        f"multipart_{fits}_max_size_white",
        multipart([("g", f"{j}.png", white) for j in range(fits)]),
        MULTIPART,
        expect=GRIDS,
        statuses=("scored",) * fits,
    )
    for n in (fits + 1, 64):
        add(
            "request_pixels",
            f"multipart_{n}_max_size_white",
            multipart([("g", f"{j}.png", white) for j in range(n)]),
            MULTIPART,
            status=413,
        )
        add(
            "request_pixels",
            f"msgpack_{n}_max_size_white",
            pack({"grids": [{"image": white}] * n}),
            "application/msgpack",
            status=413,
        )
