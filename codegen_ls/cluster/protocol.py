"""The wire formats the cluster speaks: OpenAI ``/v1/completions`` and llama.cpp's ``/infill``.

Pure functions, no Ray and no HTTP framework: a request body (a dict) in, the engine's keyword
arguments out; a :class:`~codegen_ls.engine.engine.Generation` in, the response body out. The
Ray Serve application (:mod:`codegen_ls.cluster.app`) and the tests both call them.

``/v1/completions`` follows OpenAI's legacy completions API (``prompt`` as text or token ids,
``suffix``, ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``logprobs``, ``echo``, ``stop``,
``seed``); ``usage.prompt_tokens_details.cached_tokens`` says how much of the prompt the replica's
KV cache held. Extensions (ignored by other servers' clients, sent only to ours):

- request ``heal`` (token healing, as the local engine does), ``top_k``, ``deadline_ms`` (decoding
  stops there and returns what it has), ``echo_from`` (with ``echo``: prompt log-probs only from
  that position on, so the cached prefix is not run again);
- response ``choices[i].logprobs.token_ids`` and ``top_token_ids`` (``[[id, logprob], ...]`` per
  position: token ids, where OpenAI gives strings), ``choices[i].finish_detail`` (``eos`` | ``stop``
  | ``length`` | ``deadline``) and ``codegen_ls`` (``replica``, ``cached_tokens``, timings).

``/infill`` takes llama.cpp server's fields (``input_prefix``, ``input_suffix``, ``input_extra``
``[{filename, text}]``, ``prompt``, ``n_predict``, ``t_max_predict_ms``, ``cache_prompt``,
``temperature``, ``stop``, ``n_probs``) and answers in its shape (``content``, ``tokens_cached``,
``timings``). CodeGen has no fill-in-the-middle tokens, so the suffix only stops generation early
where the model starts to repeat it; the extra chunks are put before the prefix as comments-free
file context, as llama.cpp does for models without a repo-level FIM format.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_TOKENS_LIMIT = 2048
MAX_N = 16
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16  # OpenAI's default


class ProtocolError(ValueError):
    """A request the server answers with 400 and this one line."""


@dataclass
class CompletionArgs:
    """One completions request, checked: what the engine is called with."""

    prompt: str | list[int]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    echo_from: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = 0
    heal: bool = False
    deadline_ms: float | None = None
    suffix: str | None = None


def _num(body: dict[str, Any], key: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise ProtocolError(f"'{key}' must be a number")
    if not lo <= value <= hi:
        raise ProtocolError(f"'{key}' must be between {lo} and {hi}")
    return kind(value)


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value) or len(value) > 16:
        raise ProtocolError("'stop' must be a non-empty string or a list of up to 16 of them")
    return list(value)


def parse_completion(body: Any) -> CompletionArgs:
    """Check an OpenAI completions body; raises :class:`ProtocolError` with one line."""
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise ProtocolError("'prompt' must be a string or a list of token ids (one prompt per request)")
    elif not isinstance(prompt, str):
        raise ProtocolError("'prompt' must be a string or a list of token ids")
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _num(body, "logprobs", None, int, 0, MAX_LOGPROBS)
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise ProtocolError("'suffix' must be a string")
    deadline = body.get("deadline_ms")
    return CompletionArgs(
        prompt=prompt,
        max_tokens=_num(body, "max_tokens", DEFAULT_MAX_TOKENS, int, 0, MAX_TOKENS_LIMIT),
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 0.0, 1.0),
        top_k=_num(body, "top_k", 40, int, 0, 1_000_000),
        n=_num(body, "n", 1, int, 1, MAX_N),
        logprobs=logprobs,
        echo=bool(body.get("echo", False)),
        echo_from=_num(body, "echo_from", 1, int, 1, 1 << 30),
        stop=_stop_list(body.get("stop")),
        seed=_num(body, "seed", 0, int, 0, 2**63 - 1) if body.get("seed") is not None else 0,
        heal=bool(body.get("heal", False)),
        deadline_ms=None if deadline is None else _num(body, "deadline_ms", None, float, 1, 600_000),
        suffix=suffix,
    )


def stop_at_strings(stops: Sequence[str]) -> Any:
    """An engine stop callback cutting before the first of ``stops`` (OpenAI's ``stop``), or None."""
    if not stops:
        return None

    def cut(text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return min(hits) if hits else None

    return cut


def finish_reason(detail: str) -> str:
    """OpenAI's two reasons: ``stop`` (end of text or a stop rule) or ``length`` (tokens or time ran out)."""
    return "stop" if detail in ("eos", "stop") else "length"


def top_entries(logp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, log-prob) of one position, most likely first."""
    k = min(k, logp.shape[-1])
    idx = np.argpartition(-logp, k - 1)[:k]
    idx = idx[np.argsort(-logp[idx])]
    return [(int(i), float(logp[i])) for i in idx]


@dataclass
class Choice:
    """One candidate as the response carries it (text, tokens, log-probs)."""

    text: str
    token_ids: list[int]
    token_logprobs: list[float | None]
    finish_detail: str
    top: list[list[tuple[int, float]]] | None = None  # per position, when logprobs were asked


def completion_response(
    choices: Sequence[Choice],
    *,
    model: str,
    prompt_tokens: int,
    cached_tokens: int,
    logprobs: int | None,
    decode: Any,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAI ``text_completion`` body. ``decode`` maps token ids to text (the tokenizer's)."""
    out = []
    for i, c in enumerate(choices):
        lp: dict[str, Any] | None = None
        if logprobs is not None:
            tokens = [decode([t]) for t in c.token_ids]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            top = c.top or [[] for _ in c.token_ids]
            lp = {
                "tokens": tokens,
                "token_logprobs": c.token_logprobs,
                "text_offset": offsets,
                "top_logprobs": [{decode([t]): v for t, v in row} if row else None for row in top],
                "token_ids": c.token_ids,
                "top_token_ids": [[[t, v] for t, v in row] for row in top],
            }
        out.append(
            {
                "text": c.text,
                "index": i,
                "logprobs": lp,
                "finish_reason": finish_reason(c.finish_detail),
                "finish_detail": c.finish_detail,
            }
        )
    completion = sum(len(c.token_ids) for c in choices)
    body: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        },
    }
    if extra:
        body["codegen_ls"] = extra
    return body


# -- llama.cpp /infill --------------------------------------------------------------------------


@dataclass
class InfillArgs:
    prompt: str  # extra chunks + prefix (+ the request's own ``prompt``), what the model continues
    suffix: str
    n_predict: int
    deadline_ms: float | None
    cache_prompt: bool
    temperature: float
    stop: list[str]
    n_probs: int


def parse_infill(body: Any) -> InfillArgs:
    """Check a llama.cpp ``/infill`` body; raises :class:`ProtocolError`."""
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object")
    prefix, suffix, extra = body.get("input_prefix", ""), body.get("input_suffix", ""), body.get("input_extra", [])
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise ProtocolError("'input_prefix' and 'input_suffix' must be strings")
    if not isinstance(extra, list) or not all(
        isinstance(c, dict) and isinstance(c.get("text", ""), str) for c in extra
    ):
        raise ProtocolError("'input_extra' must be a list of {filename, text} objects")
    chunks = []
    for c in extra:  # llama.cpp's own layout for models without repo-level FIM tokens: file name, then text
        name = c.get("filename") or ""
        chunks.append((f"# {name}\n" if name else "") + str(c.get("text", "")))
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ProtocolError("'prompt' must be a string")
    n_predict = _num(body, "n_predict", DEFAULT_MAX_TOKENS * 8, int, -1, MAX_TOKENS_LIMIT)
    t_max = body.get("t_max_predict_ms")
    return InfillArgs(
        prompt="".join(ch if ch.endswith("\n") else ch + "\n" for ch in chunks) + prefix + prompt,
        suffix=suffix,
        n_predict=MAX_TOKENS_LIMIT if n_predict < 0 else n_predict,
        deadline_ms=None if not t_max else _num(body, "t_max_predict_ms", None, float, 1, 600_000),
        cache_prompt=bool(body.get("cache_prompt", True)),
        temperature=_num(body, "temperature", 0.0, float, 0.0, 2.0),
        stop=_stop_list(body.get("stop")),
        n_probs=_num(body, "n_probs", 0, int, 0, MAX_LOGPROBS),
    )


def infill_response(
    text: str,
    *,
    model: str,
    prompt_tokens: int,
    cached_tokens: int,
    predicted: int,
    prompt_ms: float,
    predicted_ms: float,
    finish_detail: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """llama.cpp server's completion shape (the fields its editor clients read)."""
    return {
        "content": text,
        "model": model,
        "stop": True,
        "stopped_eos": finish_detail == "eos",
        "stopped_limit": finish_detail == "length",
        "stopped_word": finish_detail == "stop",
        "stop_type": {"eos": "eos", "stop": "word", "length": "limit"}.get(finish_detail, "limit"),
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt_tokens,
        "tokens_cached": cached_tokens,
        "timings": {
            "prompt_n": prompt_tokens - cached_tokens,
            "prompt_ms": round(prompt_ms, 2),
            "predicted_n": predicted,
            "predicted_ms": round(predicted_ms, 2),
            "predicted_per_second": round(1000 * predicted / predicted_ms, 2) if predicted_ms > 0 else 0.0,
            "cache_n": cached_tokens,
        },
        "codegen_ls": extra,
    }


def suffix_stop(suffix: str) -> Any:
    """A stop callback for ``/infill``: cut where the text starts repeating the suffix's first line."""
    first = suffix.split("\n", 1)[0].strip()
    if len(first) < 4:
        return None
    return lambda text: i if (i := text.find(first)) >= 0 else None


def chain_stops(*stops: Any) -> Any:
    """One stop callback: the earliest cut of those given (None ones skipped)."""
    fns = [s for s in stops if s is not None]
    if not fns:
        return None

    def cut(text: str) -> int | None:
        hits = [c for c in (f(text) for f in fns) if c is not None]
        return min(hits) if hits else None

    return cut
