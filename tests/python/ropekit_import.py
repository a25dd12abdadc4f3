"""Imports the built ropekit module from ROPEKIT_PYTHONPATH (ctest sets it), failing loudly."""
import importlib
import os
import sys


def import_ropekit(*submodules):
    path = os.environ.get("ROPEKIT_PYTHONPATH")
    if not path:
        raise RuntimeError(
            "ROPEKIT_PYTHONPATH is not set: point it at <build dir>/python (ctest sets it)")
    sys.path.insert(0, path)
    try:
        module = importlib.import_module("ropekit")
        for name in submodules:
            importlib.import_module(f"ropekit.{name}")
    except ImportError as e:
        raise RuntimeError(f"cannot import ropekit from ROPEKIT_PYTHONPATH={path}: {e}") from e
    return module
