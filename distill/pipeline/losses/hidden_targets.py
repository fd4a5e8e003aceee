"""The teacher's stored hidden states as targets of the representation terms: centered, clipped and scaled
with the store's statistics, so that every hidden-state term is O(1). Pure tensor functions; stage 1 measures
the clip on its calibration rows (teacher/calibration.py), stage 2 applies it (train/learner.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

# [target-clip note] Stored teacher states are centered per dimension with the store's statistics. A
# dimension that was nearly constant on the calibration rows (std ~1e-6) or a massive activation on a few
# tokens can still lie 1e3 of its dimension's std away on another row, and one such value outweighs every
# other position of the batch in an MSE. Each value is therefore clipped at ±10 of its own dimension's std
# (a Gaussian dimension gets there with probability ~1e-23): ordinary values stay untouched and what one
# element can cost is bounded, so the feature, layerwise and attention-alignment terms stay O(1). The clip
# is kept (a robust loss such as Huber instead would change every hidden term's goldens and scale) and
# measured: stage 1 counts the share of values it clips on the calibration rows, per layer, and records it
# in the manifest (``calibration.hidden_clip_share``, teacher/calibration.py ``fit_hidden_layer``); ``distill train``
# prints it.
# A share far above a Gaussian's says that a layer's massive activations are a real part of its targets, flattened.
TARGET_CLIP = 10.0
TARGET_EPS = 1e-5  # added to each dimension's std: a constant dimension clips to ~0, never divides by 0

# [target-scale note] After the clip, a layer's targets are divided by ONE scale, the root mean square of
# its dimensions' stds (so the mean squared target per dimension is 1 and the terms keep their O(1)
# scale), not by each dimension's own std. Without --hidden-dim the stored dimensions are already
# standardized at stage 1 (every std ~1), so the two are the same. With it they are PCA components whose
# variances are the eigenvalues: dividing each by its own std (whitening) would give the noise in the
# last components the weight of the leading ones; one scale keeps their relative variance, so an MSE over
# the components weighs errors as one over the standardized teacher dimensions does (the basis is
# orthonormal), up to the dropped components and a constant factor.


def describe_clip_share(shares: dict[str, float]) -> str:
    """The manifest's ``calibration.hidden_clip_share`` for a log line: ``layer 6 0.003%, layer 12 0.000%``."""
    return ", ".join(f"layer {layer} {share:.3%}" for layer, share in shares.items())


def hidden_target_scale(std: Tensor) -> Tensor:
    """(D,) per-dimension std of a layer's stored states -> () the layer's one target scale ([target-scale note])."""
    return std.float().pow(2).mean().sqrt()


def standardize_hidden(
    hidden: Tensor,
    mean: Tensor,
    std: Tensor,
    scale: Tensor | None = None,
    eps: float = TARGET_EPS,
    clip: float = TARGET_CLIP,
) -> Tensor:
    """A layer's teacher states as targets, fp32: (hidden - mean) clipped at ±clip · (std + eps) per dimension
    ([target-clip note]), divided by ``scale``, one number per layer ([target-scale note]); ``scale`` None
    divides each dimension by its own std + eps (unit variance each). hidden (.., D); mean, std (D,)."""
    bound = clip * (std.float() + eps)
    centered = torch.maximum(torch.minimum(hidden.float() - mean.float(), bound), -bound)
    return centered / (std.float() + eps if scale is None else scale.float())
