"""Settings: one tree of dataclasses, every field with a default, camelCase on the wire.

Clients send them under the ``codegenLs`` namespace (``initializationOptions`` and
``workspace/didChangeConfiguration``). :func:`parse_settings` never raises: invalid input yields
the defaults plus a list of problems, which the server shows once with ``window/showMessage``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

NAMESPACE = "codegenLs"
MULTILINE_MODES = ("auto", "always", "never")
COMPLETION_FALLBACK_MODES = ("auto", "always", "never")
BACKENDS = ("local", "remote")


def setting(
    default: Any, doc: str = "", *, lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = ()
) -> Any:
    """A :class:`Settings` field: its default, what it does (the README table), its bounds or
    choices. One table: validation, the README table, the VS Code ``package.json``
    minimum/maximum/enum and ``tests/test_settings_surface.py`` all read it (:func:`schema`)."""
    return field(default=default, metadata={"doc": doc, "min": lo, "max": hi, "choices": choices})


@dataclass
class Settings:
    model_path: str | None = setting(
        None, "model directory; empty: `$CODEGEN_LS_MODEL`, then the embedded model (changing it reloads)"
    )
    max_new_tokens: int = setting(48, "most tokens generated per suggestion", lo=1, hi=512)
    num_candidates: int = setting(
        3, "model candidates from one shared prefill, greedy included; also the most items returned", lo=1, hi=8
    )
    context_tokens: int = setting(1024, "token budget of the prompt (text before the cursor)", lo=16, hi=8192)
    temperature: float = setting(0.8, "sampling temperature of the non-greedy candidates", lo=0, hi=2)
    multiline: str = setting(
        "auto",
        "`auto` (multi-line on an empty line after a block opener or in a body), `always`, `never`",
        choices=MULTILINE_MODES,
    )
    completion_fallback: str = setting(
        "auto",
        "suggestions also in the completion menu: `auto` (only for editors without inline completion), `always`, "
        "`never`",
        choices=COMPLETION_FALLBACK_MODES,
    )
    deadline_ms: int = setting(
        1000, "time budget of one request; decoding stops there and returns what it has", lo=1, hi=60_000
    )
    min_confidence: float = setting(
        0.1, "suggestions less likely than this to be exactly right (calibrated, 0-1) are not shown", lo=0, hi=1
    )
    threads: int = setting(0, "onnxruntime threads, 0 = all cores", lo=0, hi=256)
    prompt_cache_mb: int = setting(
        0,
        "memory for the documents' KV caches (MB, least recently used dropped); 0: sized to the model, "
        "8 documents at contextTokens (embedded model: 45 MB)",
        lo=0,
        hi=65_536,
    )
    lookup: bool = setting(True, "candidates copied from other lines of the document, scored by the model")
    lookup_other_documents: bool = setting(True, "also from the other open documents")
    fim: bool = setting(
        True, "fill-in-the-middle: the model also reads the text after the cursor (models with FIM tokens)"
    )
    debounce_ms: int = setting(
        0, "server-side wait before starting the model (clients debounce already)", lo=0, hi=5000
    )
    repo_lookup: bool = setting(True, "candidates copied from the workspace folders' files (.gitignore respected)")
    repo_context: bool = setting(True, "the most related snippets of the workspace's files at the start of the prompt")
    repo_context_tokens: int = setting(
        128, "token budget of those snippets (at most a quarter of contextTokens); 0: none", lo=0, hi=4096
    )
    latency_target_ms: int = setting(
        150,
        "sizes requests to this (engine.latency); a contextTokens/maxNewTokens you give wins; 0: off",
        lo=0,
        hi=10_000,
    )
    adaptive_threshold: bool = setting(
        False, "raise minConfidence past what this user rarely accepts (local statistics)"
    )
    backend: str = setting(
        "local", "`local`, or `remote` (an OpenAI-compatible /v1/completions server)", choices=BACKENDS
    )
    remote_url: str = setting("", "the remote backend's base URL, e.g. http://gpu-box:8000")
    remote_model: str = setting("", "the ``model`` field sent; empty: the server's first model")
    remote_api_key_env: str = setting("", "NAME of the environment variable holding the API key (never the key)")
    remote_fim: bool = setting(False, "send the text after the cursor as ``suffix`` (fill-in-the-middle servers)")
    # not a setting: the fields the user gave (on the wire or on the command line), so that an
    # explicit value wins over an automatic one even where it equals the default
    explicit: frozenset[str] = field(default=frozenset(), compare=False, metadata={"wire": False})

    def is_explicit(self, name: str) -> bool:
        """Whether the user chose ``name``'s value: they gave it, or it differs from the default."""
        return name in self.explicit or getattr(self, name) != _DEFAULTS[name]

    def validate(self) -> list[str]:
        problems = _check_bounds(self)
        if self.backend == "remote" and not re.match(r"https?://[^/\s]+", self.remote_url):
            problems.append("remoteUrl must be an http:// or https:// URL when backend is remote")
        if self.remote_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.remote_api_key_env):
            problems.append("remoteApiKeyEnv must be the NAME of an environment variable (not the key)")
        return problems


def _wire_fields() -> list[Any]:
    return [f for f in fields(Settings) if f.metadata.get("wire", True)]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


_converter = cattrs.Converter(forbid_extra_keys=True)
_overrides: dict[str, Any] = {
    f.name: override(rename=_camel(f.name)) if f.metadata.get("wire", True) else override(omit=True)
    for f in fields(Settings)
}
_converter.register_structure_hook(
    Settings, make_dict_structure_fn(Settings, _converter, _cattrs_forbid_extra_keys=True, **_overrides)
)
_converter.register_unstructure_hook(Settings, make_dict_unstructure_fn(Settings, _converter, **_overrides))


def parse_settings(raw: Any) -> tuple[Settings, list[str]]:
    """Structure the ``codegenLs`` object (or a dict containing it); return (settings, problems).

    On any problem the result is the full defaults (never a half-applied mix).
    """
    if isinstance(raw, dict) and NAMESPACE in raw:
        raw = raw[NAMESPACE]
    if raw is None:
        return Settings(), []
    if not isinstance(raw, dict):
        return Settings(), [f"{NAMESPACE} settings must be an object, got {type(raw).__name__}"]
    try:
        settings = _converter.structure(raw, Settings)
    except Exception as exc:  # cattrs ClassValidationError / ForbiddenExtraKeysError
        msgs = cattrs.transform_error(exc) if isinstance(exc, cattrs.BaseValidationError) else [str(exc)]
        return Settings(), [f"invalid {NAMESPACE} settings: {m}" for m in msgs]
    problems = settings.validate()
    if problems:
        return Settings(), problems
    wire = {_camel(f.name): f.name for f in _wire_fields()}
    settings.explicit = frozenset(wire[k] for k in raw if k in wire)
    return settings, []


def to_wire(settings: Settings) -> dict[str, Any]:
    return _converter.unstructure(settings)  # type: ignore[no-any-return]


def _check_bounds(settings: Settings) -> list[str]:
    """The problems with ``settings``' values against each field's bounds and choices."""
    problems = []
    for f in _wire_fields():
        value, lo, hi, choices = (
            getattr(settings, f.name),
            f.metadata.get("min"),
            f.metadata.get("max"),
            f.metadata.get("choices"),
        )
        if lo is not None and hi is not None and not lo <= value <= hi:
            problems.append(f"{_camel(f.name)} must be between {lo:g} and {hi:g}")
        if choices and value not in choices:
            problems.append(f"{_camel(f.name)} must be one of {', '.join(choices)}")
    return problems


def schema() -> list[dict[str, Any]]:
    """Every setting as the editors and the README see it: wire name, type, default, doc, and
    minimum/maximum or enum where it has them."""
    out = []
    defaults = asdict(Settings())
    for f in _wire_fields():
        default = defaults[f.name]
        entry: dict[str, Any] = {
            "name": _camel(f.name),
            "type": str(f.type),
            "default": default,
            "doc": f.metadata.get("doc", ""),
        }
        if f.metadata.get("min") is not None:
            entry["minimum"], entry["maximum"] = f.metadata["min"], f.metadata["max"]
        if f.metadata.get("choices"):
            entry["enum"] = list(f.metadata["choices"])
        out.append(entry)
    return out


def markdown_table() -> str:
    """The README's settings table, generated from :func:`schema` (``python -m codegen_ls.settings``)."""
    rows = ["| setting (`codegenLs.*`) | default | range | meaning |", "| --- | --- | --- | --- |"]
    for entry in schema():
        span = f"{entry['minimum']:g}–{entry['maximum']:g}" if "minimum" in entry else ", ".join(entry.get("enum", []))
        doc = str(entry["doc"]).replace("|", "\\|")
        rows.append(f"| `{entry['name']}` | `{json.dumps(entry['default'])}` | {span} | {doc} |")
    return "\n".join(rows) + "\n"


def describe() -> list[tuple[str, str, Any]]:
    """(wire name, type, default) of every setting, for the README table and ``--help``."""
    defaults = asdict(Settings())
    return [(_camel(f.name), str(f.type), defaults[f.name]) for f in _wire_fields()]


__all__ = [
    "NAMESPACE",
    "Settings",
    "parse_settings",
    "to_wire",
    "describe",
    "schema",
    "markdown_table",
    "setting",
    "field",
]

_DEFAULTS = {f.name: f.default for f in fields(Settings)}

if __name__ == "__main__":  # python -m codegen_ls.settings: the README table
    print(markdown_table(), end="")
