"""Fill-in-the-middle: the special tokens, the manifest record and the prompt layout (one owner).

A model does FIM when its tokenizer has StarCoder's three special tokens (our embedded model's
recipe, ``models/recipe/train.py``, adds them and trains with them; Salesforce's CodeGen checkpoints
have none and get prefix-only prompts). ``codegen-ls model export`` detects them and records
``"fim": {"format": "spm", "prefix": id, "middle": id, "suffix": id}`` in the manifest.

Prompts use the **SPM** order (StarCoder's variant, also trained)::

    <fim_prefix><fim_suffix>{text after the cursor}<fim_middle>{text before the cursor}

and the model writes the middle, ending it with ``<|endoftext|>``. SPM rather than PSM because of
the KV cache: while the user types, the text after the cursor stays the same and the text before it
only grows at its end, so each keystroke's prompt extends the previous one and the engine's prompt
cache (longest common token prefix) reuses all of it. With PSM the suffix would come after the
growing prefix and be recomputed at every keystroke.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX, MIDDLE, SUFFIX = "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
TOKENS = (PREFIX, MIDDLE, SUFFIX)
FORMAT = "spm"


@dataclass(frozen=True)
class Fim:
    """The token ids of a FIM model."""

    prefix: int
    middle: int
    suffix: int
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "prefix": self.prefix, "middle": self.middle, "suffix": self.suffix}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Fim | None:
        """The manifest's record, or None for a model without FIM (an empty or missing record)."""
        if not data:
            return None
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown FIM format {data.get('format')!r} (expected {FORMAT!r})")
        return cls(int(data["prefix"]), int(data["middle"]), int(data["suffix"]))


def detect(tokenizer_json: Path) -> Fim | None:
    """The FIM token ids of a ``tokenizer.json`` (its added special tokens), or None."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    ids = {t["content"]: int(t["id"]) for t in data.get("added_tokens", []) if t.get("special")}
    if all(t in ids for t in TOKENS):
        return Fim(ids[PREFIX], ids[MIDDLE], ids[SUFFIX])
    return None


def spm_prompt(before: str, after: str) -> str:
    """The prompt text for a cursor with ``before`` / ``after`` text (each already within its budget)."""
    return f"{PREFIX}{SUFFIX}{after}{MIDDLE}{before}"


def strip_tokens(text: str) -> str:
    """Remove FIM token strings from document text, so a file cannot inject them into a prompt."""
    for t in TOKENS:
        text = text.replace(t, "")
    return text
