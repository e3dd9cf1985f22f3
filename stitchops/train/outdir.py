"""Output folders checked before any work: a run never ends in a traceback after training
or evaluating because its results cannot be written."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_folder(path, flag: str = "--out") -> Path:
    """``path`` as a Path, or ValueError (naming ``flag``) unless it is, or can become, a
    writable folder: not a file, no file on the way to it, the nearest existing folder
    writable. Writes nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder: name a folder")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path}: {ancestor} is a file, so no folder can be made there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {ancestor} is not writable")
    return p
