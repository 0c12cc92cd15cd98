"""Where a download lands. DEST is a directory that receives every object under its path
below the source, unless the caller asks for ``cp`` semantics (the CLI does) and the source
names one object: then, as with ``cp`` and ``aws s3 cp``, an existing directory or a DEST
ending in ``/`` receives the file under its own name, and any other DEST is the file itself.

Only checks of the local paths live here; nothing is created, fetched or removed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.prefetch.errors import InvalidDestinationError


@dataclass(frozen=True)
class Placement:
    """The directory the engine downloads into; ``name``: the file name the one object gets
    there when DEST is the file itself (None: every object keeps its path)."""

    directory: Path
    name: str | None = None


def place(dest: str | os.PathLike[str], single: bool, copy: bool) -> Placement:
    """Read DEST for a source that names one object (``single``) or several; raises
    ``InvalidDestinationError`` where a file stands where a directory must be."""
    text = os.fspath(dest)
    path = Path(text)
    wants_directory = text.endswith("/") or (os.altsep is not None and text.endswith(os.altsep))
    if copy and single and not wants_directory and not os.path.isdir(path):
        if path.name in ("", ".", ".."):
            raise InvalidDestinationError(f"{text}: not a name a file can be given")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise InvalidDestinationError(f"{text} exists and is neither a directory nor a file")
        _need_directory(path.parent, text, "")
        return Placement(path.parent, path.name)
    if copy and single:
        why = "DEST ends in '/', which names a directory"
    elif copy:
        why = "the source is a prefix or a file list, which needs a directory"
    else:
        why = "the objects are downloaded into a directory"
    _need_directory(path, text, why)
    return Placement(path)


def _need_directory(path: Path, text: str, why: str) -> None:
    """Raise unless ``path`` is a directory or could be made one (no file in the way)."""
    for candidate in (path, *path.parents):
        if os.path.isdir(candidate):
            return
        if os.path.lexists(candidate):
            if candidate == path and why:
                raise InvalidDestinationError(f"{text} is a file, not a directory ({why})")
            raise InvalidDestinationError(f"{text}: {candidate} is a file, not a directory")
