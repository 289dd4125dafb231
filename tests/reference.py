"""Batch normalization written out in float64 numpy: the one reference every jbn test uses.

Each formula is written once, from its textbook or TF definition, with no jbn or JAX code, so a
test that compares jbn against it compares two independent implementations. Inputs are converted
to float64; weights (or masks) broadcast against the input, and elements of weight 0 may hold
anything (NaN, Inf): they are zeroed before any arithmetic.

- moments, normalization, training-mode batch norm and its closed-form gradient
  (`moments`, `normalize`, `batch_norm`, `batch_norm_vjp`);
- running averages: TF's exponential moving average, zero-debiased as in TF/Adam, the
  cumulative average, Bessel's correction and the count-weighted pooling of ghost batches
  (`moving_average`, `moving_averages`, `unbiased_variance`, `pooled`);
- batch renormalization (Ioffe 2017) with TF1/Keras's running statistics
  (`renorm_correction`, `batch_renorm`, `RenormState`, `renorm_training`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


def as64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- batch norm


def moments(x, axes, weights=None, *, keepdims: bool = True):
    """Weighted mean, biased variance and total weight of `x` over `axes`.

    mean = sum(w x) / sum(w), variance = sum(w (x - mean)^2) / sum(w); `weights` None means all
    ones, a boolean mask counts its True elements. Returns (mean, variance, count).
    """
    x = as64(x)
    w = np.ones_like(x) if weights is None else np.broadcast_to(as64(weights), x.shape)
    x = np.where(w != 0, x, 0.0)
    count = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / count
    variance = (w * (x - mean) ** 2).sum(axes, keepdims=True) / count
    if not keepdims:
        mean, variance, count = (np.squeeze(a, axes) for a in (mean, variance, count))
    return mean, variance, count


def normalize(x, mean, variance, offset, scale, epsilon):
    """tf.nn.batch_normalization: (x - mean) / sqrt(variance + epsilon) * scale + offset.

    `offset` or `scale` None leaves that step out.
    """
    y = (as64(x) - mean) / np.sqrt(variance + epsilon)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


def batch_norm(x, axes, offset, scale, epsilon, weights=None):
    """Training-mode batch norm: `x` normalized with its own (weighted) moments over `axes`.

    Returns (y, mean, variance), the statistics with kept dimensions.
    """
    mean, variance, _ = moments(x, axes, weights)
    return normalize(x, mean, variance, offset, scale, epsilon), mean, variance


def batch_norm_vjp(
    x,
    weights,
    scale,
    offset,
    dy,
    epsilon,
    *,
    virtual_batch_size=None,
    renorm_statistics=None,
    clipping=None,
):
    """Outputs and closed-form gradients of sum(dy * y) for batch norm over the rows of 2-D `x`.

    `weights` per row (0: padding, which reaches nothing); statistics per group of
    `virtual_batch_size` rows (all rows if None). With `renorm_statistics=(mean, stddev)` the
    output is (x_hat * r + d) * scale + offset with r and d constants (`renorm_correction`,
    clipped by `clipping`, a dict of rmin/rmax/dmax). With xhat = (x - mean) / sigma,
    g = dy * scale * r (dy zeroed on padding) and N = sum(w), the input gradient is
    dx = (g - w sum(g) / N - w xhat sum(g xhat) / N) / sigma.
    Returns (y, dx, dscale, doffset); y on padding rows means nothing (compare counted rows).
    """
    x = as64(x)
    w = as64(weights)[:, None]
    dy = np.where(w > 0, as64(dy), 0.0)
    clipping = clipping or {}
    group = virtual_batch_size or len(x)
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dscale, doffset = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for start in range(0, len(x), group):
        rows = slice(start, start + group)
        xs, ws, g = np.where(w[rows] > 0, x[rows], 0.0), w[rows], dy[rows]
        mean, variance, total = moments(xs, 0, ws)
        sigma = np.sqrt(variance + epsilon)
        xhat = (xs - mean) / sigma
        r, d = np.ones_like(mean), np.zeros_like(mean)
        if renorm_statistics is not None:
            r, d = renorm_correction(mean, variance, *renorm_statistics, epsilon, **clipping)
        y[rows] = (xhat * r + d) * scale + offset
        dscale += (g * (xhat * r + d)).sum(0)
        doffset += g.sum(0)
        dxhat = g * scale * r
        dx[rows] = dxhat - ws * dxhat.sum(0) / total - ws * xhat * (dxhat * xhat).sum(0) / total
        dx[rows] /= sigma
    return y, dx, dscale, doffset


# ----------------------------------------------------------------------------- running averages


def moving_average(old, value, decay):
    """One step of TF's exponential moving average: `decay` weighs the old value."""
    return decay * old + (1 - decay) * value


def moving_averages(values: Sequence, decay, initial=0.0, *, zero_debias: bool = False) -> list:
    """The running average after each of `values` (float64 arrays).

    Exponential from `initial`; zero-debiased as TF/Adam (a biased accumulator starting at 0,
    reported as biased / (1 - decay**step), `initial` unused); `decay` None: the cumulative
    average, the mean of the values so far (PyTorch's momentum=None).
    """
    history, average = [], as64(0.0 if zero_debias else initial)
    for step, value in enumerate(values, start=1):
        if decay is None:
            average = average + (as64(value) - average) / step
            history.append(average)
        else:
            average = moving_average(average, as64(value), decay)
            history.append(average / (1 - decay**step) if zero_debias else average)
    return history


def unbiased_variance(variance, count):
    """Bessel's correction, variance * n / (n - 1); one counted element keeps variance 0."""
    count = as64(count)
    return as64(variance) * count / np.maximum(count - 1, 1)


def pooled(counts, values):
    """The count-weighted mean over ghost batches (axis 0), as their statistics are pooled."""
    counts = as64(counts)
    return (counts * as64(values)).sum(0) / counts.sum(0)


# ----------------------------------------------------------------------------- batch renorm


def renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, **clipping):
    """Batch renorm's r and d (Ioffe 2017, Algorithm 1) as TF1 computes them.

    sigma_B = sqrt(variance + epsilon), r = clip(sigma_B / sigma, rmin, rmax) and
    d = clip((mean - mu) / sigma, -dmax, dmax), with mu, sigma the renorm statistics and sigma
    floored at sqrt(epsilon) as TF does; a bound left out of `clipping` does not clip.
    """
    stddev = np.maximum(as64(renorm_stddev), np.sqrt(epsilon))
    r = np.sqrt(as64(variance) + epsilon) / stddev
    d = (as64(mean) - renorm_mean) / stddev
    dmax = clipping.get("dmax", np.inf)
    r = np.clip(r, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
    return r, np.clip(d, -dmax, dmax)


def batch_renorm(x, axes, offset, scale, renorm_mean, renorm_stddev, epsilon, **clipping):
    """Training-mode batch renorm: ((x - mean) / sigma_B * r + d) * scale + offset.

    Returns (y, r, d); r and d have the statistics' kept dimensions.
    """
    mean, variance, _ = moments(x, axes)
    r, d = renorm_correction(mean, variance, renorm_mean, renorm_stddev, epsilon, **clipping)
    y = normalize(x, mean, variance, None, None, epsilon) * r + d
    return y * scale + offset, r, d


class RenormState(NamedTuple):
    """TF1/Keras renorm's running statistics: the inference ones and renorm's own."""

    moving_mean: np.ndarray
    moving_stddev: np.ndarray
    renorm_mean: np.ndarray
    renorm_stddev: np.ndarray

    @classmethod
    def init(cls, mean0, variance0) -> RenormState:
        """Keras: every stddev starts at sqrt(moving-variance initializer), renorm_mean at the
        mean's."""
        mean, stddev = as64(mean0), np.sqrt(as64(variance0))
        return cls(mean, stddev, mean, stddev)

    def update(self, mean, variance, *, decay, renorm_decay, epsilon) -> RenormState:
        """Moving averages of the batch mean and of sigma_B = sqrt(variance + epsilon)."""
        sigma = np.sqrt(as64(variance) + epsilon)
        return RenormState(
            moving_average(self.moving_mean, mean, decay),
            moving_average(self.moving_stddev, sigma, decay),
            moving_average(self.renorm_mean, mean, renorm_decay),
            moving_average(self.renorm_stddev, sigma, renorm_decay),
        )

    def moving_variance(self, epsilon):
        """The reported variance, stddev^2 - epsilon, so that sqrt(variance + epsilon) = stddev."""
        return np.maximum(self.moving_stddev**2 - epsilon, 0)


def renorm_training(
    batches, scale, offset, *, decay, renorm_decay, epsilon, clipping, mean0=0.0, variance0=1.0
):
    """TF1/Keras batch renorm trained over `batches` (features last).

    Returns the training outputs, the inference outputs with the statistics before each step,
    whether r / d were clipped at each step, and the final statistics by variable name.
    """
    shape = np.shape(scale)
    state = RenormState.init(np.full(shape, mean0), np.full(shape, variance0))
    outputs, inference, clipped = [], [], []
    for x in batches:
        mean, variance, _ = moments(x, tuple(range(x.ndim - 1)), keepdims=False)
        moving_variance = state.moving_variance(epsilon)
        inference.append(normalize(x, state.moving_mean, moving_variance, offset, scale, epsilon))
        batch_and_renorm = (mean, variance, state.renorm_mean, state.renorm_stddev, epsilon)
        r_unclipped, d_unclipped = renorm_correction(*batch_and_renorm)
        r, d = renorm_correction(*batch_and_renorm, **(clipping or {}))
        clipped.append((np.any(r != r_unclipped), np.any(d != d_unclipped)))
        outputs.append((normalize(x, mean, variance, None, None, epsilon) * r + d) * scale + offset)
        state = state.update(
            mean, variance, decay=decay, renorm_decay=renorm_decay, epsilon=epsilon
        )
    stats = {**state._asdict(), "moving_variance": state.moving_variance(epsilon)}
    return outputs, inference, clipped, stats
