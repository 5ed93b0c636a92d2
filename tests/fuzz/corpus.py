"""The whole corpus, deterministic for a seed, with the categories interleaved."""

from __future__ import annotations

import random

import numpy as np

from .batches import add_batch_cases
from .encoders import Case, Corpus
from .http import add_http_cases
from .images import add_image_cases
from .structured import add_structured_cases


def build_corpus(grids: np.ndarray, seed: int) -> list[Case]:
    """Every malformed request, deterministically from ``seed`` and the good ``grids`` [N, 128, 128, 3] uint8."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    corpus = Corpus()
    add_image_cases(corpus, rng, nrng, grids)
    add_structured_cases(corpus, rng, grids)
    add_http_cases(corpus, nrng, grids)
    add_batch_cases(corpus, rng, grids)
    cases = corpus.cases
    order = list(range(len(cases)))
    rng.shuffle(order)  # interleave the categories so that slow and fast requests overlap
    return [cases[i] for i in order]
