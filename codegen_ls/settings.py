"""Settings: one tree of dataclasses, every field with a default, camelCase on the wire.

Clients send them under the ``codegenLs`` namespace (``initializationOptions`` and
``workspace/didChangeConfiguration``). :func:`parse_settings` never raises: invalid input yields
the defaults plus a list of problems, which the server shows once with ``window/showMessage``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cattrs
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

NAMESPACE = "codegenLs"
MULTILINE_MODES = ("auto", "always", "never")
BACKENDS = ("local", "remote")


@dataclass
class Settings:
    model_path: str | None = None  # None: $CODEGEN_LS_MODEL, then the embedded default model
    max_new_tokens: int = 48
    num_candidates: int = 3
    context_tokens: int = 1024
    temperature: float = 0.8
    multiline: str = "auto"  # auto | always | never
    deadline_ms: int = 1000
    min_confidence: float = 0.0  # 0..1; below it nothing is shown
    threads: int = 0  # onnxruntime intra-op threads, 0: all cores
    prompt_cache_mb: int = 0  # memory for the documents' KV caches (MB); 0: sized to the model, 8 documents at contextTokens
    lookup: bool = True  # candidates copied from lines of this document
    lookup_other_documents: bool = True  # ... and from other open documents
    debounce_ms: int = 0  # server-side wait before starting the model (clients usually debounce)
    latency_target_ms: int = 150  # sizes requests to this (engine.latency) where contextTokens/maxNewTokens are default; 0: off
    adaptive_threshold: bool = False  # raise minConfidence past what this user rarely accepts (local statistics)
    backend: str = "local"  # local | remote (an OpenAI-compatible /v1/completions server)
    remote_url: str = ""  # the remote backend's base URL, e.g. http://gpu-box:8000
    remote_model: str = ""  # the ``model`` field sent; empty: the server's first model
    remote_api_key_env: str = ""  # NAME of the environment variable holding the API key (never the key)
    remote_fim: bool = False  # send the text after the cursor as ``suffix`` (fill-in-the-middle servers)

    def validate(self) -> list[str]:
        problems = []
        if not 1 <= self.max_new_tokens <= 512:
            problems.append("maxNewTokens must be between 1 and 512")
        if not 1 <= self.num_candidates <= 8:
            problems.append("numCandidates must be between 1 and 8")
        if not 16 <= self.context_tokens <= 8192:
            problems.append("contextTokens must be between 16 and 8192")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append("temperature must be between 0 and 2")
        if self.multiline not in MULTILINE_MODES:
            problems.append(f"multiline must be one of {', '.join(MULTILINE_MODES)}")
        if not 0 < self.deadline_ms <= 60_000:
            problems.append("deadlineMs must be between 1 and 60000")
        if not 0.0 <= self.min_confidence <= 1.0:
            problems.append("minConfidence must be between 0 and 1")
        if not 0 <= self.threads <= 256:
            problems.append("threads must be between 0 and 256")
        if not 0 <= self.prompt_cache_mb <= 65_536:
            problems.append("promptCacheMb must be between 0 and 65536")
        if not 0 <= self.debounce_ms <= 5000:
            problems.append("debounceMs must be between 0 and 5000")
        if not 0 <= self.latency_target_ms <= 10_000:
            problems.append("latencyTargetMs must be between 0 and 10000")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {', '.join(BACKENDS)}")
        if self.backend == "remote" and not re.match(r"https?://[^/\s]+", self.remote_url):
            problems.append("remoteUrl must be an http:// or https:// URL when backend is remote")
        if self.remote_api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.remote_api_key_env):
            problems.append("remoteApiKeyEnv must be the NAME of an environment variable (not the key)")
        return problems


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


_converter = cattrs.Converter(forbid_extra_keys=True)
_overrides: dict[str, Any] = {f.name: override(rename=_camel(f.name)) for f in fields(Settings)}
_converter.register_structure_hook(Settings, make_dict_structure_fn(Settings, _converter, _cattrs_forbid_extra_keys=True, **_overrides))
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
    return (Settings(), problems) if problems else (settings, [])


def to_wire(settings: Settings) -> dict[str, Any]:
    return _converter.unstructure(settings)  # type: ignore[no-any-return]


def describe() -> list[tuple[str, str, Any]]:
    """(wire name, type, default) of every setting, for the README table and ``--help``."""
    return [(_camel(f.name), str(f.type), v) for f, v in zip(fields(Settings), asdict(Settings()).values())]


__all__ = ["NAMESPACE", "Settings", "parse_settings", "to_wire", "describe", "field"]
