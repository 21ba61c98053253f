"""Models: a factory for every model source, and the CIFAR ResNets as transformers models.

- :func:`create_model` -- registered names (``resnet32_cifar`` ...), local directories, Hub ids,
  timm architectures (through ``TimmWrapperForImageClassification``) or configs, with the head
  sized to the dataset and ``id2label``/``label2id`` filled;
- :func:`create_image_processor` -- the matching image processor (``None`` for the CIFAR ResNets);
- :func:`list_models`, :func:`register_model`, :func:`is_model` -- the registry of local names;
- :class:`ResNetCifarConfig`, :class:`ResNetCifarForImageClassification` -- LDAM-DRW's CIFAR
  ResNet (ResNet-32: 0.46M parameters), registered with the transformers Auto classes on import,
  so ``AutoModelForImageClassification.from_pretrained(saved_dir)`` works after
  ``import hf_longtail.models``.
"""

from __future__ import annotations

from hf_longtail.models.factory import (
    create_image_processor,
    create_model,
    is_model,
    list_models,
    register_model,
    resolve_labels,
)
from hf_longtail.models.resnet_cifar import (
    NormedLinear,
    ResNetCifarConfig,
    ResNetCifarForImageClassification,
    ResNetCifarModel,
    ResNetCifarPreTrainedModel,
)

__all__ = [
    "NormedLinear",
    "ResNetCifarConfig",
    "ResNetCifarForImageClassification",
    "ResNetCifarModel",
    "ResNetCifarPreTrainedModel",
    "create_image_processor",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
    "resolve_labels",
]
