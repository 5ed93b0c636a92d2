"""Carve3D reward: the Multi-view Reconstruction Consistency (MRC) metric.

Data flows one way: bytes -> decode -> views -> reconstruct -> render -> crop
-> distance -> score. Each arrow is one module of this package.
"""

__version__ = "0.1.0"
