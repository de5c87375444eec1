"""Nothing leaves the machine: onnxruntime's telemetry is off before onnxruntime loads.

Official onnxruntime builds (its 1DS telemetry, on Linux, macOS and Windows) create a device id
and an event store in the user's cache directory (``Microsoft/DeveloperTools/.onnxruntime``
there) as soon as the library is imported, and later resolve and contact Microsoft's collector
(``mobile.events.data.microsoft.com``). ``ORT_DISABLE_TELEMETRY=1``, set before onnxruntime
initializes, prevents all of it for the process (onnxruntime's ``Privacy.md``);
``onnxruntime.disable_telemetry_events()`` alone only suppresses later events.

``codegen_ls/__init__.py`` calls :func:`disable_telemetry` before anything else, so every entry
point (``serve``, ``complete``, ``doctor``, ``model export``, the benchmarks, the tests) loads
onnxruntime only after it; the engine also calls :func:`disable_events` once onnxruntime is in.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "ORT_DISABLE_TELEMETRY"


def disable_telemetry() -> bool:
    """Set ``ORT_DISABLE_TELEMETRY=1`` (inherited by subprocesses too); False when onnxruntime was
    already imported, so only its later events can still be stopped."""
    os.environ[ENV] = "1"
    if "onnxruntime" in sys.modules:
        disable_events()
        return False
    return True


def disable_events() -> None:
    """``onnxruntime.disable_telemetry_events()``, where this onnxruntime has it."""
    ort = sys.modules.get("onnxruntime")
    off = getattr(ort, "disable_telemetry_events", None)
    if off is not None:
        try:
            off()
        except Exception as exc:  # a build without telemetry may refuse: nothing to stop then
            log.debug("disable_telemetry_events: %r", exc)
