"""The small vocabularies that travel between layers, as enums: completion mode, suggestion
source, finish reason.

Each is a ``str`` enum: a member equals its value (``Mode.MULTI == "multi"``), prints and
serializes as it (logs, ``codegen-ls complete --json``, the completion item's detail), so the
wire and the statistics keys stay plain text while the code names the cases.
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Mode(StrEnum):
    """What a completion may be, decided before any model call (``context.decide_mode``)."""

    NONE = "none"  # no completion here
    SINGLE = "single"  # the rest of the line
    MULTI = "multi"  # a block


class FinishReason(StrEnum):
    """Why a candidate's generation ended."""

    EOS = "eos"  # the model's end of text
    STOP = "stop"  # a stop rule cut it
    LENGTH = "length"  # max_new_tokens
    DEADLINE = "deadline"  # the request's time ran out


class Source(StrEnum):
    """Where a candidate came from. A copied draft the model continued is ``<source>+model``
    (:func:`verified`)."""

    MODEL = "model"  # the engine's own candidates before the pipeline names them
    GREEDY = "greedy"
    SAMPLE = "sample"
    TYPEAHEAD = "typeahead"  # a shown suggestion served again while the user types along
    LOOKUP_LINE = "lookup:line"
    LOOKUP_DOC = "lookup:doc"
    LOOKUP_REPO = "lookup:repo"
    LOOKUP_NGRAM = "lookup:ngram"


VERIFIED_SUFFIX = "+model"


def verified(source: str) -> str:
    """``source`` of a draft the model continued past where it stopped agreeing."""
    return source + VERIFIED_SUFFIX


def base_source(source: str) -> str:
    """``lookup:doc+model`` -> ``lookup:doc``."""
    return source.split("+", 1)[0]
