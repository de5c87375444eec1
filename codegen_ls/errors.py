"""The one error type of codegen-ls, and its kinds.

Every user-facing failure (missing file, bad position, missing or broken model) is a
:class:`CodegenLsError` carrying one clear line; the CLI prints it, the server maps it to an
LSP error or message in exactly one place.
"""

from __future__ import annotations


class CodegenLsError(Exception):
    """A failure with a message meant for the user (one line, no traceback)."""


class ModelError(CodegenLsError):
    """The model directory is missing, incomplete, corrupt or inconsistent."""


class Cancelled(CodegenLsError):
    """Generation was cancelled (newer request or ``$/cancelRequest``)."""
