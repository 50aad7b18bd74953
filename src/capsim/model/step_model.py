"""A continuous-batching engine step's time as a linear model of its composition, fitted to measured steps.

``t = c0 + c1 x prefill_tokens + c2 x prefill_context + c3 x decodes + c4 x decode_context`` (seconds),
where ``prefill_context`` sums, over the step's prefill chunks, chunk tokens x tokens already cached
(attention work), and ``decode_context`` sums the decodes' contexts. DistServe's simulator uses this
family; ``c0`` is the per-step overhead (scheduling, launch, Python), which a simulator must not assume
away: one that charged none under-predicted TTFT by 17 to 56% (inference-sim PR #480, see
``/work/shared/reference/serving_engines.md``). The fit is non-negative least squares, so no term can
buy a better fit with a negative cost; it stores its residuals and the range of each feature it saw.

By default each step's error counts relative to its time (weights ``1 / seconds``): measured steps span
about 1 to 50 ms, and in plain least squares the few longest steps decide every coefficient, the overhead
included, where a latency is judged by relative error. Relative residuals are reported per kind of step
(decode-only, prefill-only, mixed), so a kind the linear form does not fit shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES: tuple[str, ...] = ("prefill_tokens", "prefill_context", "decodes", "decode_context")


class StepFitError(ValueError):
    """Too few or degenerate measurements to fit; the message says what is missing."""


@dataclass(frozen=True)
class StepTimeFit:
    """Fitted coefficients (``c0`` in s, the rest in s per unit), residual statistics and the fitted range.

    ``c0_stderr_s`` is the standard error of the overhead from the unconstrained least-squares fit, so a
    caller can tell an overhead that is measured from one that is noise."""

    coefficients: tuple[float, float, float, float, float]
    residual_rms_s: float
    r2: float
    n_steps: int
    ranges: Mapping[str, tuple[float, float]]
    c0_stderr_s: float
    #: per kind of step (decode, prefill, mixed): (steps, median and 90th percentile of |relative residual|),
    #: the median's sign kept (positive: the model under-predicts)
    residuals_by_kind: Mapping[str, tuple[int, float, float]] = field(default_factory=dict)

    @property
    def overhead_s(self) -> float:
        return self.coefficients[0]

    def predict(self, prefill_tokens: float, prefill_context: float, decodes: float, decode_context: float) -> float:
        """Seconds of a step of this composition."""
        c0, c1, c2, c3, c4 = self.coefficients
        return c0 + c1 * prefill_tokens + c2 * prefill_context + c3 * decodes + c4 * decode_context

    def to_dict(self) -> dict[str, Any]:
        return {"form": "c0 + c1*prefill_tokens + c2*prefill_context + c3*decodes + c4*decode_context",
                "coefficients": list(self.coefficients), "residual_rms_s": self.residual_rms_s, "r2": self.r2,
                "n_steps": self.n_steps, "ranges": {k: list(v) for k, v in self.ranges.items()},
                "c0_stderr_s": self.c0_stderr_s,
                "residuals_by_kind": {k: list(v) for k, v in self.residuals_by_kind.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepTimeFit:
        try:
            c = tuple(float(x) for x in d["coefficients"])
            if len(c) != 5:
                raise StepFitError(f"step_model.coefficients must hold 5 numbers, got {len(c)}")
            return cls((c[0], c[1], c[2], c[3], c[4]), float(d["residual_rms_s"]), float(d["r2"]),
                       int(d["n_steps"]), {k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()},
                       float(d["c0_stderr_s"]),
                       {k: (int(v[0]), float(v[1]), float(v[2])) for k, v in d.get("residuals_by_kind", {}).items()})
        except KeyError as exc:
            raise StepFitError(f"step_model lacks {exc.args[0]!r}") from None


def fit_step_time(features: np.ndarray, seconds: np.ndarray, *, relative: bool = True) -> StepTimeFit:
    """Fit the model to measured steps: ``features`` is (n, 4) in ``FEATURES`` order, ``seconds`` (n,);
    ``relative``: weight each step by ``1 / seconds`` (see the module docstring), else plain least squares."""
    from scipy.optimize import nnls

    x = np.asarray(features, dtype=float)
    y = np.asarray(seconds, dtype=float)
    if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(y) != len(x):
        raise StepFitError(f"features must be (n, {len(FEATURES)}) with one time per row, got {x.shape} "
                           f"and {y.shape}")
    if len(y) < 2 * (len(FEATURES) + 1):
        raise StepFitError(f"need at least {2 * (len(FEATURES) + 1)} measured steps, got {len(y)}")
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)) or np.any(y <= 0):
        raise StepFitError("features and times must be finite and times > 0")
    a = np.column_stack([np.ones(len(y)), x])
    w = 1.0 / y if relative else np.ones(len(y))
    aw, yw = a * w[:, None], y * w
    # scale columns so that NNLS is well conditioned, then scale the coefficients back
    scale = np.maximum(np.abs(aw).max(axis=0), 1e-12)
    coef_scaled, _ = nnls(aw / scale, yw)
    coef = coef_scaled / scale
    resid = y - a @ coef
    ss_res = float(resid @ resid)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    # the overhead's standard error from (weighted) ordinary least squares on the columns that vary
    used = [0] + [j for j in range(1, a.shape[1]) if np.ptp(a[:, j]) > 0]
    au = aw[:, used]
    beta, *_ = np.linalg.lstsq(au, yw, rcond=None)
    r_ols = yw - au @ beta
    dof = max(len(y) - len(used), 1)
    sigma2 = float(r_ols @ r_ols) / dof
    cov = sigma2 * np.linalg.pinv(au.T @ au)
    c0_se = math.sqrt(max(float(cov[0, 0]), 0.0))
    ranges = {name: (float(x[:, j].min()), float(x[:, j].max())) for j, name in enumerate(FEATURES)}
    rel = resid / y
    kind = np.where(x[:, 0] == 0, "decode", np.where(x[:, 2] == 0, "prefill", "mixed"))
    by_kind = {k: (int((kind == k).sum()), float(np.median(rel[kind == k])),
                   float(np.percentile(np.abs(rel[kind == k]), 90)))
               for k in ("decode", "prefill", "mixed") if (kind == k).any()}
    c = tuple(float(v) for v in coef)
    return StepTimeFit((c[0], c[1], c[2], c[3], c[4]), math.sqrt(ss_res / len(y)),
                       1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0, len(y), ranges, c0_se, by_kind)
