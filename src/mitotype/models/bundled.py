"""The model that ships inside the package: ``predict`` uses it when no ``--model`` is given.

It is the fold ensemble of a cross-validation run of the default recipe, trained on the AMi-Br
training split only, stored in half precision (:func:`mitotype.workflows.bundle.bundle_run`) with one ordinary model card per
fold, so it loads through the same code as any other model. ``bundle.json`` says where it came from:
recipe, command, the run's cross-validated metrics and its size.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

from mitotype.errors import MitotypeError

BUNDLE_INFO = "bundle.json"


def bundled_model_dir() -> Path:
    """The installed bundle's folder (fold_*/ model artifacts + bundle.json)."""
    folder = Path(str(importlib.resources.files("mitotype") / "bundled"))
    if not (folder / BUNDLE_INFO).is_file():
        raise MitotypeError("this installation has no bundled model; pass a model folder or cv run directory as model")
    return folder


def bundled_detector_dir() -> Path:
    """The installed bundled detector's folder (``detect`` and ``analyze`` use it when no model is given)."""
    folder = Path(str(importlib.resources.files("mitotype") / "bundled_detector"))
    if not (folder / BUNDLE_INFO).is_file():
        raise MitotypeError("this installation has no bundled detector; pass a detector model folder or cv run directory as model")
    return folder


def bundle_info() -> dict[str, Any]:
    return json.loads((bundled_model_dir() / BUNDLE_INFO).read_text())
