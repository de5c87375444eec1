"""Calibrated confidence: the probability that a suggestion is exactly right, from its evidence.

A logistic regression over a candidate's features (:data:`FEATURES`, computed by
:func:`codegen_ls.suggest.ranking.features`): where it came from (greedy, sample, a copy from
this document, another open document, the repository, an n-gram), how the copy matched (distance,
context agreement, how much of it the model kept, how many of its tokens the model rejected), the
model's mean / minimum / first token log-prob, length, the syntax check, unmatched closers,
repetition, identifiers new to the context, and agreement between candidates. The same
probability ranks the candidates (evidence, not a constant, decides between a copy and the
model's text) and is the ``confidence`` compared with ``minConfidence``.

Coefficients are a small JSON file (this format's one owner is this module, ``FORMAT``): the
package ships ``confidence.json`` beside this module, fitted for the embedded model; a model
directory may carry its own ``confidence.json``, which takes precedence (a model's log-probs mean
different things). Serving is numpy only: standardize, dot product, sigmoid. Fitting
(:func:`fit`: Newton's method with an L2 penalty, numpy only) and the reliability table
(:func:`reliability`) are used by ``benchmarks/fit_confidence.py``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "codegen-ls-confidence/1"
FILENAME = "confidence.json"
PACKAGE_FILE = Path(__file__).with_name(FILENAME)
FEATURES = (
    "src_sample",
    "src_line",
    "src_doc",
    "src_repo",
    "src_ngram",  # the group's best source (greedy: none)
    "model_continued",  # a copy the model continued ("+model")
    "votes",
    "has_greedy",
    "mixed_votes",  # agreement between candidates
    "lp_mean",
    "lp_min",
    "lp_first",
    "lp_mean_copy",
    "lp_min_copy",  # model log-probs (the copy's own too)
    "tokens_log",
    "chars_log",  # length
    "syntax_error",
    "closers",
    "repeats",
    "reindented",
    "partial",  # structure
    "distance_log",
    "agree",
    "copied_frac",
    "rejected",  # how the copy matched and was verified
    "idents_new",
    "idents_shared",  # identifiers of the first line new to / shared with the context
    "multi",
    "blank_prefix",  # the situation
)
MAX_CONFIDENCE = 0.99  # a model is never certain; minConfidence 1 therefore shows nothing


@dataclass(frozen=True)
class ConfidenceModel:
    """Standardized logistic regression: p = sigmoid(bias + weights . (x - mean) / scale)."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    info: dict[str, Any] = field(default_factory=dict)  # what it was fitted on (model, data, metrics)

    def logit(self, x: np.ndarray) -> np.ndarray:
        """Log-odds of ``x`` (rows of features in ``names`` order)."""
        return self.bias + ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weights  # (N,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-np.clip(self.logit(x), -30, 30)))

    def vector(self, feats: dict[str, float]) -> np.ndarray:
        return np.array([float(feats.get(n, 0.0)) for n in self.names])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "features": list(self.names),
            "mean": self.mean.round(6).tolist(),
            "scale": self.scale.round(6).tolist(),
            "weights": self.weights.round(6).tolist(),
            "bias": round(float(self.bias), 6),
            "info": self.info,
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ConfidenceModel:
        if raw.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        names = tuple(raw["features"])
        arrays = [np.asarray(raw[k], dtype=np.float64) for k in ("mean", "scale", "weights")]
        if any(a.shape != (len(names),) for a in arrays) or not np.all(arrays[1] > 0):
            raise ValueError("coefficients do not match the feature list")
        return ConfidenceModel(names, arrays[0], arrays[1], arrays[2], float(raw["bias"]), dict(raw.get("info", {})))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @staticmethod
    def load(path: Path) -> ConfidenceModel:
        return ConfidenceModel.from_json(json.loads(path.read_text(encoding="utf-8")))


_cache: dict[str, ConfidenceModel | None] = {}


def for_model(model_dir: str | Path | None) -> ConfidenceModel | None:
    """The coefficients for a model directory: its own ``confidence.json``, else the package's.

    None (with one warning) when neither can be read; the ranking then falls back to log-probs.
    """
    key = str(model_dir or "")
    if key not in _cache:
        found: ConfidenceModel | None = None
        for path in ([Path(model_dir) / FILENAME] if model_dir else []) + [PACKAGE_FILE]:
            if path.is_file():
                try:
                    found = ConfidenceModel.load(path)
                    break
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.warning("cannot read %s: %s", path, exc)
        if found is None:
            log.warning("no confidence coefficients: ranking by log-probs, confidence uncalibrated")
        _cache[key] = found
    return _cache[key]


def fit(
    x: np.ndarray,
    y: np.ndarray,
    names: tuple[str, ...] = FEATURES,
    l2: float = 1.0,
    iterations: int = 50,
    info: dict[str, Any] | None = None,
) -> ConfidenceModel:
    """L2-penalized logistic regression by Newton's method on standardized features (numpy only).

    ``l2`` is the penalty on the standardized weights (the bias is free).
    """
    x = np.asarray(x, dtype=np.float64)  # (N, F)
    y = np.asarray(y, dtype=np.float64)  # (N,)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])  # (N, F+1): bias column first
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return ConfidenceModel(tuple(names), mean, scale, w[1:], float(w[0]), dict(info or {}))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[list[dict[str, float]], float]:
    """Rows (confidence bucket, count, mean confidence, observed exact rate) and the expected
    calibration error (count-weighted mean |confidence - observed|)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    rows, ece = [], 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        n = int(sel.sum())
        if n == 0:
            rows.append({"lo": lo, "hi": hi, "n": 0, "confidence": math.nan, "observed": math.nan})
            continue
        conf, obs = float(p[sel].mean()), float(y[sel].mean())
        ece += n / max(1, len(p)) * abs(conf - obs)
        rows.append({"lo": lo, "hi": hi, "n": n, "confidence": round(conf, 4), "observed": round(obs, 4)})
    return rows, round(ece, 4)


__all__ = ["ConfidenceModel", "FEATURES", "FORMAT", "FILENAME", "MAX_CONFIDENCE", "for_model", "fit", "reliability"]
