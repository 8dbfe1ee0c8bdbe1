"""The ``lmforge`` console script: runs the command-line tool installed with the package."""
from __future__ import annotations

import os
import sys


def binary() -> str:
    """Path of the ``lmforge`` executable that ships inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "lmforge")


def main() -> None:
    path = binary()
    if not os.access(path, os.X_OK):
        sys.exit(f"lmforge: error: {path}: the command-line tool is missing from this installation")
    os.execv(path, [path, *sys.argv[1:]])


if __name__ == "__main__":
    main()
