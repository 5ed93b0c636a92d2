"""Carve3D RL finetuning: on-policy policy gradient with per-prompt normalised KL advantages.

The trainer samples multi-view grids from a diffusion policy with per-step
log-probabilities, scores them with the MRC reward service (through
:mod:`carve3d_reward.client` only), and updates the policy with
``sum_t grad log p(x_{t-1} | x_t) * (alpha A_r - beta A_KL)``.
"""

__version__ = "0.1.0"
