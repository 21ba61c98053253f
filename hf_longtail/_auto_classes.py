"""Register the CIFAR ResNets with the transformers Auto classes on ``import hf_longtail``.

``pipeline("image-classification", model=run_dir)``, ``AutoConfig`` and
``AutoModelForImageClassification`` look a saved model's ``model_type`` ("resnet_cifar") up in
transformers' Auto registry, which :mod:`hf_longtail.models.resnet_cifar` fills when it is
imported. ``import hf_longtail`` must stay light (``import hf_longtail.losses`` imports only
torch), so instead of importing the model now, :func:`install` registers it as soon as
transformers' Auto registry is loaded: at once when it already is, otherwise when a transformers
module finishes loading, ``transformers.models.auto.configuration_auto`` (which every Auto
class and ``pipeline`` import) is loaded and no transformers module is still half-initialised
(the model module imports more of transformers; doing so inside an import cycle would fail).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

_NEEDED = ("transformers.models.auto.configuration_auto",)
_state = {"done": False, "running": False}


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _ready() -> bool:
    if not all(_loaded(n) for n in _NEEDED):
        return False
    return all(
        _loaded(name)
        for name in list(sys.modules)
        if name == "transformers" or name.startswith("transformers.")
    )


def _register_if_ready() -> None:
    if _state["done"] or _state["running"] or not _ready():
        return
    _state["running"] = True
    try:
        import hf_longtail.models.resnet_cifar  # noqa: F401  (registers on import)

        _state["done"] = True
    except ImportError as err:  # e.g. an import cycle inside transformers: retry at next event
        logger.debug("CIFAR ResNet Auto registration deferred: %s", err)
    finally:
        _state["running"] = False


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then registers if everything needed is now loaded."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.inner.exec_module(module)
        # The module is complete but its spec still says "initializing" until the import
        # machinery returns; mark it done for the readiness check.
        module.__spec__._initializing = False
        _register_if_ready()


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of transformers' modules (found by the other finders) until done."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if _state["done"] or not (name == "transformers" or name.startswith("transformers.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' Auto registry is loaded, else when it loads (once)."""
    _register_if_ready()
    if not _state["done"] and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
