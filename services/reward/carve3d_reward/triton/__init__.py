"""Serving :class:`~carve3d_reward.model.MRCModel` with NVIDIA Triton Inference Server.

- :mod:`.tensors`: the KServe v2 tensor interface (names, dtypes, shapes) and the
  request-batching function every Triton flavour runs; numpy only, so the stock
  Triton Python backend (``services/reward/triton/model_repository``) can import it.
- :mod:`.binding`: the same model bound with PyTriton (``pip install 'carve3d-reward[triton]'``),
  which ``mrc serve --engine triton`` starts next to the gateway.

See docs/triton.md.
"""
