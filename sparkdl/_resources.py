"""Where sparkdl's data folders are: ``schemas/`` and ``spark-conf/``.

The top-level folders of the source tree are the only copy kept in git. A built wheel holds
only the package, so ``setup.py`` copies both folders into ``sparkdl/_data/`` of the build;
an installed wheel reads them there, a source or editable checkout reads the top-level ones.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__: list[str] = []  # internal

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str, *, env: str | None = None) -> Path:
    """The folder ``name`` (``schemas`` or ``spark-conf``): ``$env`` if set, else the copy in
    the installed package, else the one of the source checkout."""
    if env and os.environ.get(env):
        path = Path(os.environ[env])
        if not path.is_dir():
            raise RuntimeError(f"{env}={path} is not a folder; point it at a {name}/ folder or unset it")
        return path
    tried = [_PACKAGE / "_data" / name, _PACKAGE.parent / name]
    for path in tried:
        if path.is_dir():
            return path
    raise RuntimeError(
        f"sparkdl's {name}/ folder is missing (looked in {', '.join(map(str, tried))}); reinstall sparkdl "
        f"from a wheel or a source checkout" + (f", or set {env} to a {name}/ folder" if env else "")
    )
