""".gitignore matching for the workspace index (git's ``gitignore(5)`` rules, no git needed).

A :class:`Ignore` holds the patterns of the ``.gitignore`` files met on the way down a folder
tree; :meth:`Ignore.child` adds a subfolder's own file. Rules, as git applies them:

- blank lines and ``#`` comments are skipped, ``\\#`` / ``\\!`` escape them, trailing spaces go;
- ``!pattern`` re-includes what an earlier pattern excluded (not inside an excluded folder:
  the walk never enters one);
- ``pattern/`` matches folders only;
- a pattern with a ``/`` before its end is anchored to its ``.gitignore``'s folder, otherwise it
  matches a name at any depth;
- ``*`` and ``?`` do not match ``/``; ``**`` matches across folders (``**/x``, ``x/**``, ``a/**/b``);
- the last matching pattern wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_GITIGNORE_BYTES = 256_000  # a larger .gitignore is read up to this


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    base: str  # folder of the .gitignore, relative to the root, "" or ending in "/"


def _translate(pattern: str) -> str:
    """A gitignore glob (no leading ``/``) as a regular expression over a relative path."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern[i : i + 2] == "**":
                before_ok = i == 0 or pattern[i - 1] == "/"
                after = pattern[i + 2 : i + 3]
                if before_ok and after == "/":  # "**/": zero or more folders
                    out.append("(?:.*/)?")
                    i += 3
                    continue
                if before_ok and after == "":  # trailing "/**": everything inside
                    out.append(".*")
                    i += 2
                    continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse(text: str, base: str = "") -> list[_Rule]:
    """The rules of one ``.gitignore`` whose folder is ``base`` (relative, "" for the root)."""
    rules = []
    prefix = base.rstrip("/") + "/" if base.strip("/") else ""
    for raw in text.splitlines():
        line = raw.rstrip("\r")
        while line.endswith(" ") and not line.endswith("\\ "):
            line = line[:-1]
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        elif line.startswith("\\!") or line.startswith("\\#"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        body = _translate(line)
        expr = (re.escape(prefix) + body) if anchored else (re.escape(prefix) + "(?:.*/)?" + body)
        rules.append(_Rule(re.compile(expr + r"\Z", re.S), negate, dir_only, prefix))
    return rules


class Ignore:
    """The rules in force in one folder (its own ``.gitignore`` and its parents')."""

    def __init__(self, rules: tuple[_Rule, ...] = ()) -> None:
        self.rules = rules

    def child(self, folder: Path, rel: str) -> Ignore:
        """The rules inside ``folder`` (relative path ``rel``): these plus its ``.gitignore``."""
        path = folder / ".gitignore"
        try:
            with path.open("rb") as f:
                text = f.read(MAX_GITIGNORE_BYTES).decode("utf-8", "replace")
        except OSError:
            return self
        return Ignore(self.rules + tuple(parse(text, rel)))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        """Is the path ``rel`` (relative to the root, ``/``-separated) ignored?"""
        result = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(rel):
                result = not rule.negate
        return result


__all__ = ["Ignore", "parse"]
