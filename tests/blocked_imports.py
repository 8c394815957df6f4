"""Packages that fail to import, for a folder put first on a subprocess's PYTHONPATH: what a tool
must do without (TensorFlow before a bad input is answered, in a conversion; what the GPU
machine lacks)."""

from __future__ import annotations

import os
from typing import Iterable


def blocked_packages(folder: str | os.PathLike, names: Iterable[str], why: str,
                     exception: str = "ImportError") -> str:
  """Writes into `folder` a package per name whose import raises
  `<exception>("<name> is blocked: <why>")`; returns the folder (for PYTHONPATH). SystemExit
  ends the process even where the importer catches ImportError (a tripwire)."""
  for name in names:
    package = os.path.join(folder, name)
    os.makedirs(package, exist_ok=True)
    with open(os.path.join(package, "__init__.py"), "w") as f:
      f.write(f"raise {exception}({f'{name} is blocked: {why}'!r})\n")
  return os.fspath(folder)
