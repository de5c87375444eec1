"""The calibrated confidence model: fitting (numpy), the shipped coefficients, the file format,
a model directory's own coefficients, the reliability table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from codegen_ls.suggest import confidence
from codegen_ls.suggest.confidence import FEATURES, PACKAGE_FILE, ConfidenceModel, fit, for_model, reliability


def test_fit_recovers_a_known_logistic_model() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    true_w, true_b = np.array([1.5, -0.5, 0.0]), -1.0
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(x @ true_w + true_b)))
    m = fit(x, y, names=("a", "b", "c"), l2=0.01)
    raw_w = m.weights / m.scale  # back to the unstandardized scale
    assert np.allclose(raw_w, true_w, atol=0.08)
    assert abs(m.bias - float(m.mean @ raw_w) - true_b) < 0.08
    p = m.predict(x)
    rows, ece = reliability(p, y)
    assert ece < 0.02 and sum(r["n"] for r in rows) == len(x)


def test_the_shipped_coefficients_load_and_match_the_features() -> None:
    m = ConfidenceModel.load(PACKAGE_FILE)
    assert m.names == FEATURES
    assert "CALIB" in m.info["fitted_on"] and m.info["groups"] > 0
    p = m.predict(np.zeros((2, len(FEATURES))))
    assert np.all((p > 0) & (p < 1))


def test_round_trip_and_a_model_directory_takes_precedence(tmp_path: Path) -> None:
    m = ConfidenceModel(
        FEATURES, np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.full(len(FEATURES), 0.25), -2.0, {"note": "test"}
    )
    m.save(tmp_path / confidence.FILENAME)
    again = ConfidenceModel.load(tmp_path / confidence.FILENAME)
    assert again.names == m.names and np.allclose(again.weights, m.weights) and again.bias == -2.0
    assert for_model(tmp_path).info == {"note": "test"}  # the model directory's own file
    assert for_model(tmp_path / "elsewhere").info == ConfidenceModel.load(PACKAGE_FILE).info  # else the package's


def test_a_bad_file_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    raw = ConfidenceModel.load(PACKAGE_FILE).to_json()
    raw["weights"] = raw["weights"][:-1]
    try:
        ConfidenceModel.from_json(raw)
    except ValueError as exc:
        assert "feature list" in str(exc)
    else:
        raise AssertionError("a short weight list was accepted")
    (tmp_path / confidence.FILENAME).write_text(json.dumps({"format": "other"}))
    assert for_model(tmp_path).info == ConfidenceModel.load(PACKAGE_FILE).info  # falls back to the package's
