"""The embedded model's corpus: the stdlib plus permissively licensed third-party sdists, deduplicated.

One command rebuilds it (downloads are cached and checked against PyPI's sha256)::

    python models/recipe/corpus.py --cache /work/cache/corpus

Steps:

1. fetch    -- each package of ``PACKAGES`` at its pinned version, as the sdist that
               ``pip download --no-deps --no-binary :all: NAME==VERSION`` fetches (taken straight from
               PyPI's JSON API, so no build backend runs just to read metadata); the licence is read
               from the release's metadata and anything not in ``PERMISSIVE`` is refused.
2. reserved -- pallets/click and psf/requests are reserved for evaluation: never trained on. Refused by
               name (and any package vendoring them, e.g. pip), and by content: a file sharing more than
               30 % of its lines with a file of their sdists (fetched for this check only) is dropped.
3. filter   -- ``.py`` files only; vendored trees, non-UTF-8, files over 300 kB, generated or minified
               files (long lines, "generated" headers) and data tables (few identifiers per byte) dropped.
4. dedup    -- exact (normalised text) and near-duplicates (MinHash of 5-line shingles, Jaccard ≥ 0.8).
5. split    -- ``EVAL`` and ``CALIB`` packages are never trained on: EVAL for evaluation reports only,
               CALIB for fitting the confidence model. The stdlib's ``HELDOUT`` modules stay held out too.

Prints what it excluded and why; writes ``CACHE/corpus.json`` (files per split, packages with version
and licence) for ``train.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# fmt: off
# (name, version): chosen for breadth -- web and HTTP, CLIs, data and parsing, testing, async,
# packaging, typing-heavy code, tools and scripts. Pins make the corpus rebuild identically.
PACKAGES: list[tuple[str, str]] = [
    ("flask", "3.1.3"), ("werkzeug", "3.1.9"), ("jinja2", "3.1.6"), ("markupsafe", "3.0.4"),
    ("itsdangerous", "2.2.0"), ("bottle", "0.13.5"), ("falcon", "4.4.0"), ("starlette", "1.10.0"),
    ("fastapi", "0.165.0"), ("httpx", "0.29.0"), ("httpcore", "1.0.9"), ("h11", "0.16.0"),
    ("urllib3", "2.8.0"), ("tornado", "6.6.1"), ("sanic", "25.12.1"), ("aiohttp", "3.14.5"),
    ("yarl", "1.25.1"), ("multidict", "7.2.1"), ("typer", "0.29.2"), ("docopt", "0.6.2"), ("fire", "0.7.1"),
    ("rich", "15.0.0"), ("argcomplete", "3.7.2"), ("cleo", "2.1.0"), ("attrs", "26.1.0"),
    ("cattrs", "26.2.1"), ("pydantic", "2.14.4"), ("marshmallow", "4.4.0"), ("pyyaml", "6.0.4"),
    ("toml", "0.10.2"), ("tomli", "2.5.0"), ("tomlkit", "0.15.3"), ("python-dateutil", "4.0.0"),
    ("arrow", "1.4.0"), ("pyparsing", "3.3.3"), ("lark", "1.3.1"), ("simplejson", "4.3.0"),
    ("mistune", "3.4.0"), ("markdown", "3.11.3"), ("sqlparse", "0.6.1"), ("jsonschema", "4.26.0"),
    ("pytest", "9.2.0"), ("pluggy", "1.7.0"), ("iniconfig", "2.3.1"), ("mock", "5.2.0"),
    ("coverage", "7.18.0"), ("tox", "4.67.17"), ("faker", "40.63.0"), ("freezegun", "1.5.5"),
    ("anyio", "4.16.0"), ("trio", "0.35.0"), ("sniffio", "1.3.1"), ("aiofiles", "25.1.0"),
    ("async-timeout", "5.0.1"), ("packaging", "26.4"), ("wheel", "0.48.0"), ("build", "1.6.1"),
    ("virtualenv", "21.15.14"), ("hatchling", "1.33.0"), ("flit-core", "4.2.0"),
    ("pyproject-hooks", "1.3.3"), ("typing-extensions", "4.16.0"), ("typeguard", "4.6.1"),
    ("beartype", "0.23.1"), ("more-itertools", "11.2.1"), ("toolz", "1.2.0"), ("boltons", "26.2.0"),
    ("sortedcontainers", "2.4.0"), ("cachetools", "8.0.2"), ("tenacity", "9.2.1"), ("structlog", "26.1.0"),
    ("loguru", "0.7.3"), ("networkx", "3.7"), ("black", "26.10.1"), ("isort", "9.0.2"), ("flake8", "7.5.0"),
    ("pycodestyle", "2.15.0"), ("pyflakes", "4.1.0"), ("jedi", "0.20.1"), ("parso", "0.8.7"),
    ("pygments", "2.21.0"), ("sqlalchemy", "2.1.9"), ("peewee", "4.5.3"), ("alembic", "1.20.1"),
    ("celery", "5.7.0"), ("kombu", "5.7.0"), ("redis", "8.2.0"), ("invoke", "3.0.3"), ("scrapy", "2.19.0"),
    ("beautifulsoup4", "4.15.0"), ("html5lib", "1.1"), ("babel", "2.19.0"), ("pytz", "2026.6"),
    ("idna", "3.21"), ("charset-normalizer", "3.5.3"), ("six", "1.17.0"), ("wrapt", "2.5.2"),
    ("decorator", "5.3.2"), ("dill", "0.4.1"), ("cloudpickle", "3.1.3"), ("msgpack", "1.2.4"),
    ("httplib2", "0.32.1"), ("websockets", "17.4"), ("gunicorn", "27.0.1"), ("uvicorn", "0.55.0"),
    ("django", "6.1.3"),
]
# fmt: on

# Never trained on (evaluation of the project by others); refused by name and by content.
RESERVED = [("click", "8.5.1"), ("requests", "2.34.2")]
# Packages known to vendor reserved code: refused by name as well.
VENDORS_RESERVED = ["pip", "pipenv", "pip-tools"]
# Held out for our own evaluation reports (never trained on, never used for fitting).
EVAL = ["bottle", "tomlkit", "marshmallow", "boltons"]
# Held out for fitting the confidence model and choosing thresholds (never trained on).
CALIB = ["cachetools", "tenacity", "pluggy", "docopt", "structlog", "sortedcontainers"]

PERMISSIVE = (
    "MIT",
    "BSD",
    "Apache",
    "PSF",
    "Python Software Foundation",
    "ISC",
    "Unlicense",
    "0BSD",
    "Public Domain",
    "HPND",
    "Zope Public",
)

MAX_BYTES = 300_000
RESERVED_OVERLAP = 0.30  # a training file sharing more of its lines with a reserved file is dropped
NEAR_DUP = 0.8
VENDORED = re.compile(r"(^|/)(_vendor|vendor|_vendored|vendored|third_party|_distutils_hack)(/|$)")


@dataclass
class Release:
    name: str
    version: str
    url: str
    sha256: str
    licence: str


def release(name: str, version: str) -> Release:
    """The sdist of NAME==VERSION from PyPI's JSON API, with its licence from the release metadata."""
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:
        meta = json.load(r)
    info = meta["info"]  # the latest release's metadata: the licence is read from it
    sdists = [u for u in meta["releases"].get(version, []) if u["packagetype"] == "sdist"]
    if not sdists:
        raise RuntimeError(f"{name}=={version}: no sdist on PyPI")
    classifiers = [c.split("::")[-1].strip() for c in info.get("classifiers", []) if c.startswith("License")]
    text = info.get("license_expression") or (info.get("license") or "").splitlines()[0:1]
    licence = text if isinstance(text, str) else (text[0] if text else "")
    if len(licence) > 60 or not licence.strip():
        licence = " / ".join(classifiers)
    url = urllib.parse.urljoin(f"https://pypi.org/pypi/{name}/json", sdists[0]["url"])  # mirrors give relative URLs
    return Release(name, version, url, sdists[0]["digests"]["sha256"], licence.strip())


def permissive(licence: str) -> bool:
    return bool(licence) and any(p.lower() in licence.lower() for p in PERMISSIVE) and "GPL" not in licence


def fetch(rel: Release, cache: Path) -> Path:
    """Download (or reuse) the sdist and check its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / rel.url.rsplit("/", 1)[-1]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != rel.sha256:
        with urllib.request.urlopen(rel.url, timeout=300) as r:
            data = r.read()
        if hashlib.sha256(data).hexdigest() != rel.sha256:
            raise RuntimeError(f"{rel.name}: sha256 mismatch")
        path.write_bytes(data)
    return path


def sdist_files(path: Path) -> list[tuple[str, bytes]]:
    """(path inside the package, bytes) of every ``.py`` file of an sdist (top folder stripped)."""
    out = []
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if n.endswith(".py"):
                    out.append((n.split("/", 1)[-1], z.read(n)))
    else:
        with tarfile.open(path) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.endswith(".py"):
                    f = t.extractfile(m)
                    if f is not None:
                        out.append((m.name.split("/", 1)[-1], f.read()))
    return sorted(out)


def reject_reason(rel_path: str, data: bytes) -> tuple[str | None, str]:
    """(why the file is dropped or None, its text)."""
    if VENDORED.search(rel_path):
        return "vendored", ""
    if len(data) > MAX_BYTES:
        return "too large", ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8", ""
    if not text.strip():
        return "empty", ""
    lines = text.splitlines()
    head = "\n".join(lines[:8]).lower()
    if "generated by" in head or "do not edit" in head or "autogenerated" in head or "auto-generated" in head:
        return "generated", ""
    if max(len(line) for line in lines) > 1000 or len(text) / max(1, len(lines)) > 120:
        return "minified or long lines", ""
    idents = len(re.findall(r"[A-Za-z_]{3,}", text))
    if len(text) > 20_000 and idents / len(text) < 0.04:
        return "data table", ""
    return None, text


def norm_lines(text: str) -> set[str]:
    """Lines that identify a file: stripped, at least 12 characters, comments and blank lines skipped."""
    out = set()
    for line in text.splitlines():
        s = line.strip()
        if len(s) >= 12 and not s.startswith("#"):
            out.add(s)
    return out


def minhash(text: str, perms: tuple[np.ndarray, np.ndarray], k: int = 5) -> np.ndarray:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    shingles = {"\n".join(lines[i : i + k]) for i in range(max(1, len(lines) - k + 1))}
    h = np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") >> 3 for s in shingles],
        dtype=np.uint64,
    )
    a, b = perms
    prime = np.uint64((1 << 61) - 1)
    return ((h[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)


def dedup(files: list[dict]) -> tuple[list[dict], list[dict]]:
    """Exact (whitespace-normalised) and near-duplicate (MinHash LSH, Jaccard ≥ NEAR_DUP) removal.

    Among duplicates the first one in ``files`` order is kept (stdlib first, then packages).
    """
    rng = np.random.default_rng(0)
    n_perm, bands = 64, 16
    perms = (rng.integers(1, 1 << 30, n_perm, dtype=np.uint64), rng.integers(0, 1 << 30, n_perm, dtype=np.uint64))
    seen: set[str] = set()
    buckets: dict[tuple[int, bytes], int] = {}
    sigs: list[np.ndarray] = []
    kept, dropped = [], []
    for f in files:
        key = hashlib.sha256(re.sub(r"\s+", " ", f["text"]).strip().encode()).hexdigest()
        if key in seen:
            dropped.append({**f, "why": "exact duplicate"})
            continue
        sig = minhash(f["text"], perms)
        rows = n_perm // bands
        dup = None
        for bi in range(bands):
            cand = buckets.get((bi, sig[bi * rows : (bi + 1) * rows].tobytes()))
            if cand is not None and float(np.mean(sigs[cand] == sig)) >= NEAR_DUP:
                dup = cand
                break
        if dup is not None:
            dropped.append({**f, "why": f"near duplicate of {kept[dup]['pkg']}/{kept[dup]['path']}"})
            continue
        seen.add(key)
        idx = len(kept)
        kept.append(f)
        sigs.append(sig)
        for bi in range(bands):
            buckets.setdefault((bi, sig[bi * rows : (bi + 1) * rows].tobytes()), idx)
    return kept, dropped


def split_of(name: str) -> str:
    return "eval" if name in EVAL else "calib" if name in CALIB else "train"


def build(cache: Path, stdlib_files: list[tuple[str, str, str]]) -> dict:
    """Fetch, filter, check and deduplicate; write CACHE/files.jsonl and CACHE/corpus.json; return the summary.

    ``stdlib_files``: (path, text, split) of the stdlib part (train or heldout), chosen by train.py.
    """
    sdists = cache / "sdists"
    for name, _ in PACKAGES:
        if name in [r for r, _ in RESERVED] or name in VENDORS_RESERVED:
            raise SystemExit(f"{name} is reserved for evaluation (or vendors reserved code): remove it")
    with ThreadPoolExecutor(8) as ex:
        releases = list(ex.map(lambda nv: release(*nv), PACKAGES))
        reserved_rel = list(ex.map(lambda nv: release(*nv), RESERVED))
        list(ex.map(lambda r: fetch(r, sdists), releases + reserved_rel))

    reserved_lines: set[str] = set()
    for rel in reserved_rel:
        for _path, data in sdist_files(fetch(rel, sdists)):
            try:
                reserved_lines |= norm_lines(data.decode("utf-8"))
            except UnicodeDecodeError:
                pass

    excluded: list[dict] = []
    files: list[dict] = [{"pkg": "stdlib", "path": p, "split": s, "text": t} for p, t, s in stdlib_files]
    packages = []
    for rel in releases:
        if not permissive(rel.licence):
            excluded.append({"pkg": rel.name, "path": "*", "why": f"licence {rel.licence!r} not permissive"})
            continue
        n_files = 0
        for p, data in sdist_files(fetch(rel, sdists)):
            why, text = reject_reason(p, data)
            if why is None:
                lines = norm_lines(text)
                if lines and len(lines & reserved_lines) / len(lines) > RESERVED_OVERLAP:
                    why = "shares > 30 % of its lines with click/requests"
            if why:
                excluded.append({"pkg": rel.name, "path": p, "why": why})
                continue
            files.append({"pkg": rel.name, "path": p, "split": split_of(rel.name), "text": text})
            n_files += 1
        packages.append(
            {
                "name": rel.name,
                "version": rel.version,
                "licence": rel.licence,
                "split": split_of(rel.name),
                "files": n_files,
            }
        )

    kept, dups = dedup(files)
    excluded += [{k: v for k, v in d.items() if k != "text"} for d in dups]
    with open(cache / "files.jsonl", "w") as f:
        for d in kept:
            f.write(json.dumps(d) + "\n")
    summary = {
        "packages": packages,
        "reserved": [{"name": r.name, "version": r.version, "use": "content check only"} for r in reserved_rel],
        "files": {s: sum(1 for d in kept if d["split"] == s) for s in ("train", "heldout", "eval", "calib")},
        "bytes": {
            s: sum(len(d["text"]) for d in kept if d["split"] == s) for s in ("train", "heldout", "eval", "calib")
        },
        "excluded": {},
    }
    for e in excluded:
        summary["excluded"][e["why"].split(" of ")[0]] = summary["excluded"].get(e["why"].split(" of ")[0], 0) + 1
    (cache / "corpus.json").write_text(json.dumps(summary, indent=1))
    (cache / "excluded.jsonl").write_text("".join(json.dumps(e) + "\n" for e in excluded))
    for e in excluded:
        if "click" in e["why"] or "licence" in e["why"]:
            print(f"excluded {e['pkg']}/{e['path']}: {e['why']}")
    print(f"excluded {len(excluded)} files: {summary['excluded']}")
    print(f"kept: {summary['files']} files, {summary['bytes']} bytes")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("build/corpus"))
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from train import stdlib_files  # the stdlib part and its held-out modules are train.py's

    build(args.cache, stdlib_files())


if __name__ == "__main__":
    main()
