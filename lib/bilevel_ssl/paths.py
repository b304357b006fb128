"""Repository paths, resolved from the package location rather than the current directory.

Papermill runs kernels in the shell's cwd and nbval in the notebook's folder (``shared/notebook-conventions.md``),
so nothing here depends on cwd.  ``$BILEVEL_SSL_ROOT`` overrides the root (e.g. for a non-editable install).
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    env = os.environ.get("BILEVEL_SSL_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "notebooks").is_dir():
            return parent
    return Path.cwd()


def outputs_dir() -> Path:
    return repo_root() / "outputs"


def run_dir(notebook: str, profile: str) -> Path:
    """``outputs/<notebook>/<profile>/``, created."""
    d = outputs_dir() / notebook / profile
    d.mkdir(parents=True, exist_ok=True)
    return d
