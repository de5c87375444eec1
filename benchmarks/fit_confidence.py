"""Fit the calibrated confidence model (``codegen_ls/suggest/confidence.py``) on CALIB packages.

One command, after the model changes::

    python benchmarks/fit_confidence.py --out codegen_ls/suggest/confidence.json
    # or, for a model directory of its own:  --out MODEL_DIR/confidence.json --model MODEL_DIR

It runs ``eval_repo.py --packages calib --candidates --min-confidence 0`` (single-file and
repository mode; ``--data F.json`` reuses such a run instead), labels every ranked candidate
(1 when its first line is exactly the rest of the line), fits a logistic regression with numpy
(L2 strength chosen by cross-validation over files, grouped so no file is in both halves), and
prints, from the cross-validated predictions (each cursor scored by a model that never saw its
file): top-1 exact match of the new ranking against the heuristic order, the reliability table
and ECE of the top suggestion's confidence, and the precision/coverage curve with the smallest
``minConfidence`` whose shown suggestions are exactly right >= ``--target`` (0.40) with 95 %
confidence (one-sided normal bound), to compare with the default ``Settings.min_confidence``. The coefficients
record what they were fitted on. Never fit on EVAL packages (``models/recipe/corpus.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from codegen_ls.suggest.confidence import FEATURES, ConfidenceModel, fit, reliability  # noqa: E402

L2_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)
FOLDS = 5
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 17))


def load_groups(paths: list[Path], modes: list[str]) -> list[dict[str, Any]]:
    """One group per (cursor, mode): its candidates' features and labels."""
    groups = []
    for path in paths:
        data = json.loads(path.read_text())
        for records in data["records"].values():
            for r in records:
                target = r["target"].rstrip()
                for mode in modes:
                    out = r.get(mode)
                    if not out or not out.get("candidates"):
                        continue
                    cands = out["candidates"]
                    groups.append(
                        {
                            "file": f"{r['package']}/{r['file']}",
                            "mode": mode,
                            "x": np.array([[c["features"].get(n, 0.0) for n in FEATURES] for c in cands]),
                            "y": np.array([c["text"].split("\n")[0].rstrip() == target for c in cands], dtype=float),
                            "heuristic": np.array([previous_rule(c["features"]) for c in cands]),
                            "sources": [c["source"] for c in cands],
                        }
                    )
    return groups


def previous_rule(f: dict[str, float]) -> float:
    """The ranking score before this model (ranking.py's fallback: log-prob, penalties, votes,
    LOOKUP_PRIOR for a copy that breaks nothing), from a candidate's features."""
    pen = 1.5 * f["syntax_error"] + 0.5 * f["closers"] + f["repeats"] + 1.0 * f["reindented"]
    copy = any(f[k] for k in ("src_line", "src_doc", "src_repo", "src_ngram"))
    return f["lp_mean"] - pen + 0.05 * f["tokens_log"] + 0.15 * f["votes"] + 10.0 * (copy and pen == 0)


def stack(groups: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return np.vstack([g["x"] for g in groups]), np.concatenate([g["y"] for g in groups])


def cross_validated(groups: list[dict[str, Any]], l2: float) -> list[np.ndarray]:
    """Each group's candidates scored by a model fitted on the folds without its file."""
    files = sorted({g["file"] for g in groups})
    rng = np.random.default_rng(0)
    fold_of = {f: i % FOLDS for i, f in enumerate(rng.permutation(files))}
    preds: list[np.ndarray] = [np.zeros(0)] * len(groups)
    for k in range(FOLDS):
        train = [g for g in groups if fold_of[g["file"]] != k]
        x, y = stack(train)
        m = fit(x, y, l2=l2)
        for i, g in enumerate(groups):
            if fold_of[g["file"]] == k:
                preds[i] = m.predict(g["x"])
    return preds


def top(groups: list[dict[str, Any]], scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, exact) of each group's best-scored candidate."""
    conf, exact = [], []
    for g, s in zip(groups, scores):
        i = int(np.argmax(s))
        conf.append(float(s[i]))
        exact.append(float(g["y"][i]))
    return np.array(conf), np.array(exact)


def curve(conf: np.ndarray, exact: np.ndarray) -> list[dict[str, float]]:
    rows = []
    for t in (0.0, *THRESHOLDS):
        sel = conf >= t
        rows.append(
            {
                "min_confidence": t,
                "coverage": round(float(sel.mean()), 4),
                "precision": round(float(exact[sel].mean()), 4) if sel.any() else 0.0,
                "exact_match": round(float(exact[sel].sum() / len(exact)), 4),
            }
        )
    return rows


def lower_bound(p: float, n: float, z: float = 1.645) -> float:
    return p - z * (p * (1 - p) / max(1.0, n)) ** 0.5


def log_loss(groups: list[dict[str, Any]], preds: list[np.ndarray]) -> float:
    p = np.clip(np.concatenate(preds), 1e-6, 1 - 1e-6)
    y = np.concatenate([g["y"] for g in groups])
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the coefficients go (confidence.json)")
    ap.add_argument(
        "--data", type=Path, action="append", help="eval_repo.py --candidates outputs to fit on (else run it)"
    )
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--n", type=int, default=360, help="CALIB cursors when running eval_repo.py")
    ap.add_argument("--modes", default="single,repo")
    ap.add_argument("--target", type=float, default=0.40, help="precision the recommended minConfidence must reach")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")

    if not args.data:
        run = args.out.with_suffix(".calib-run.json")
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "eval_repo.py"),
            "--packages",
            "calib",
            "--n",
            str(args.n),
            "--modes",
            ",".join(modes),
            "--min-confidence",
            "0",
            "--candidates",
            "--out",
            str(run),
        ]
        if args.model:
            cmd += ["--model", args.model]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        args.data = [run]
    for p in args.data:
        packages = {r["package"] for recs in json.loads(p.read_text())["records"].values() for r in recs}
        if packages & {"bottle", "tomlkit", "marshmallow", "boltons", "click", "requests"}:
            raise SystemExit(f"{p} holds EVAL or reserved packages: never fit on them")
    groups = load_groups(args.data, modes)
    x, y = stack(groups)
    print(
        f"{len(groups)} cursor-modes, {len(y)} candidates, {int(y.sum())} exactly right; "
        f"{sum(g['y'].any() for g in groups)} cursors have a right candidate",
        file=sys.stderr,
    )

    losses = {l2: log_loss(groups, cross_validated(groups, l2)) for l2 in L2_GRID}
    best = min(losses, key=lambda k: losses[k])
    cv = cross_validated(groups, best)
    conf, exact = top(groups, cv)
    _, heuristic_exact = top(groups, [g["heuristic"] for g in groups])
    oracle = np.mean([g["y"].any() for g in groups])
    rows, ece = reliability(conf, exact)
    pc = curve(conf, exact)
    # the smallest threshold whose precision is >= target with 95 % confidence (one-sided normal bound),
    # so that held-out code, not only these cursors, clears the target
    ok = [r for r in pc if r["coverage"] > 0 and lower_bound(r["precision"], r["coverage"] * len(conf)) >= args.target]
    recommended = min(ok, key=lambda r: r["min_confidence"])["min_confidence"] if ok else None

    model = fit(x, y, l2=best)
    manifest = {}
    model_dir = Path(args.model) if args.model else ROOT / "models" / "codegen-ls-small"
    if (model_dir / "manifest.json").is_file():
        mj = json.loads((model_dir / "manifest.json").read_text())
        manifest = {k: mj.get(k) for k in ("name", "onnx_sha256", "created") if k in mj}
    info = {
        "fitted_on": "CALIB packages (models/recipe/corpus.py), eval_repo.py cursors, modes " + ",".join(modes),
        "data": [str(p) for p in args.data],
        "model": str(model_dir),
        "manifest": manifest,
        "groups": len(groups),
        "candidates": int(len(y)),
        "positives": int(y.sum()),
        "l2": best,
        "cv_log_loss": {str(k): round(v, 4) for k, v in losses.items()},
        "cv_top1_exact": round(float(exact.mean()), 4),
        "heuristic_top1_exact": round(float(heuristic_exact.mean()), 4),
        "oracle_exact": round(float(oracle), 4),
        "cv_ece": ece,
        "recommended_min_confidence": recommended,
    }
    model = ConfidenceModel(model.names, model.mean, model.scale, model.weights, model.bias, info)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)

    print(f"L2 {best} (cross-validated log-loss {', '.join(f'{k}: {v:.4f}' for k, v in losses.items())})")
    print(
        f"top-1 exact, cross-validated: {exact.mean():.1%} (the previous rule on the same candidates: "
        f"{heuristic_exact.mean():.1%}; "
        f"a right candidate exists: {oracle:.1%})"
    )
    print(
        "\nreliability of the top suggestion's confidence (cross-validated), ECE "
        f"{ece:.3f}\n| confidence | n | mean confidence | exactly right |\n|---|---:|---:|---:|"
    )
    for r in rows:
        if r["n"]:
            print(f"| {r['lo']:.1f}-{r['hi']:.1f} | {r['n']} | {r['confidence']:.3f} | {r['observed']:.3f} |")
    print("\n| minConfidence | shown | precision | exact match (all cursors) |\n|---:|---:|---:|---:|")
    for r in pc:
        print(f"| {r['min_confidence']:.2f} | {r['coverage']:.1%} | {r['precision']:.1%} | {r['exact_match']:.1%} |")
    print(
        f"\nrecommended minConfidence (the most coverage whose precision is >= {args.target:.0%} at 95 % "
        f"confidence): {recommended} (the default is Settings.min_confidence; change it where this differs)"
    )
    print("\nweights (standardized):")
    for n, w in sorted(zip(model.names, model.weights), key=lambda t: -abs(t[1])):
        print(f"  {n:16s} {w:+.3f}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
