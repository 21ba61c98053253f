"""The CIFAR ResNets of the long-tail protocols as transformers ``PreTrainedModel``s.

Architecture of He et al. (2016, Sec. 4.2) as implemented in LDAM-DRW's ``resnet_cifar.py``
(Cao et al., 2019), the backbone of the CIFAR-10/100-LT benchmarks: a 3x3 stem conv with
``widths[0]`` channels, then ``len(num_blocks)`` stages of basic blocks (the first at stride 1,
the others at stride 2) with ``widths`` channels, global average pooling and a linear (or, as LDAM
uses, cosine ``NormedLinear``) classifier. Shortcuts are LDAM's option A: parameter-free, spatial
subsampling ``x[:, :, ::2, ::2]`` plus zero-padding of the new channels. Weights follow LDAM's
``_weights_init``: Kaiming-normal (fan-in) for convolutions and the linear weight.

ResNet-32 is ``num_blocks=(5, 5, 5)``, ``widths=(16, 32, 64)``: 464,154 parameters for 10 classes
with the linear head (0.46M, as in the papers).

``import hf_longtail.models`` registers ``model_type="resnet_cifar"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForImageClassification``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)

try:  # transformers >= 5: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as _hf_init
except ImportError:  # pragma: no cover - transformers 4.x
    _hf_init = None

__all__ = [
    "NormedLinear",
    "ResNetCifarConfig",
    "ResNetCifarForImageClassification",
    "ResNetCifarModel",
    "ResNetCifarPreTrainedModel",
]


def _loaded(t: torch.Tensor) -> bool:
    return bool(getattr(t, "_is_hf_initialized", False))


def _kaiming_normal_(t: torch.Tensor) -> None:
    if _hf_init is not None:
        _hf_init.kaiming_normal_(t)
    elif not _loaded(t):  # pragma: no cover
        nn.init.kaiming_normal_(t)


def _uniform_(t: torch.Tensor, a: float, b: float) -> None:
    if _hf_init is not None:
        _hf_init.uniform_(t, a, b)
    elif not _loaded(t):  # pragma: no cover
        nn.init.uniform_(t, a, b)


def _copy_(t: torch.Tensor, value: torch.Tensor) -> None:
    # The flag lives on the Parameter object itself, so pass the parameter, not `.data`.
    if not _loaded(t):
        with torch.no_grad():
            t.copy_(value)


class ResNetCifarConfig(PretrainedConfig):
    """Configuration of :class:`ResNetCifarForImageClassification` (``model_type="resnet_cifar"``).

    Args:
        num_blocks: basic blocks per stage; ``(5, 5, 5)`` is ResNet-32 (depth ``6n + 2``).
        widths: channels per stage; the stem has ``widths[0]`` channels. Option-A shortcuts need
            non-decreasing widths.
        num_channels: input image channels.
        shortcut: ``"A"`` (LDAM/He et al. CIFAR: subsample + zero-pad, no parameters) or ``"B"``
            (1x1 conv + BatchNorm projection where the shape changes).
        normed_linear: cosine classifier of LDAM: ``logits = normalize(x) @ normalize(W)`` with
            ``W`` of shape ``(in_features, num_labels)`` and no bias. Its logits lie in [-1, 1]:
            LDAM's loss multiplies them by its scale ``s`` (30); for other losses set
            ``logit_scale``.
        logit_scale: multiplier of the cosine logits (only with ``normed_linear``; 1.0 = LDAM).
        kwargs: ``PretrainedConfig`` arguments (``num_labels``, ``id2label``, ``label2id``, ...).
    """

    model_type = "resnet_cifar"

    def __init__(
        self,
        num_blocks: Sequence[int] = (5, 5, 5),
        widths: Sequence[int] = (16, 32, 64),
        num_channels: int = 3,
        shortcut: str = "A",
        normed_linear: bool = False,
        logit_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        num_blocks = [int(b) for b in num_blocks]
        widths = [int(w) for w in widths]
        if not num_blocks or len(num_blocks) != len(widths):
            raise ValueError(
                f"num_blocks {num_blocks} and widths {widths} must be non-empty and of equal "
                "length (one entry per stage)."
            )
        if min(num_blocks) < 1 or min(widths) < 1 or int(num_channels) < 1:
            raise ValueError(
                f"num_blocks {num_blocks}, widths {widths} and num_channels {num_channels} must "
                "be positive."
            )
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B'; got {shortcut!r}.")
        if shortcut == "A" and any(b < a for a, b in itertools.pairwise(widths)):
            raise ValueError(
                f"option-A shortcuts zero-pad channels, so widths must not decrease; got {widths}. "
                "Use shortcut='B' for arbitrary widths."
            )
        if not math.isfinite(float(logit_scale)) or float(logit_scale) <= 0:
            raise ValueError(f"logit_scale must be a positive finite number; got {logit_scale}.")
        self.num_blocks = num_blocks
        self.widths = widths
        self.num_channels = int(num_channels)
        self.shortcut = shortcut
        self.normed_linear = bool(normed_linear)
        self.logit_scale = float(logit_scale)
        super().__init__(**kwargs)


class _ShortcutA(nn.Module):
    """LDAM's option-A ``LambdaLayer``: ``pad(x[:, :, ::s, ::s])`` with zeros for new channels."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        # LDAM pads planes // 4 on each side for the 16->32->64 doubling; same split in general.
        self.pad_lo, self.pad_hi = extra // 2, extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi), "constant", 0.0)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs, no conv bias."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class NormedLinear(nn.Module):
    """LDAM's cosine classifier: ``scale * normalize(x, dim=1) @ normalize(W, dim=0)``.

    ``W`` has shape ``(in_features, out_features)`` (LDAM's layout, so LDAM checkpoints load
    as is) and is initialised with unit-norm columns.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LDAM's init: ``uniform(-1, 1)`` then every column rescaled to unit L2 norm."""
        w = torch.empty_like(self.weight).uniform_(-1, 1)
        _copy_(self.weight, w.renorm(2, 1, 1e-5).mul(1e5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"
        )


class ResNetCifarPreTrainedModel(PreTrainedModel):
    """Weight init (LDAM's) and the transformers plumbing shared by the CIFAR ResNet models."""

    config_class = ResNetCifarConfig
    config: ResNetCifarConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # forward() takes **kwargs but its loss is a per-batch mean that ignores num_items_in_batch:
    # tell the Trainer so it scales the loss for gradient accumulation itself.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming-normal convs and linear weights (LDAM), PyTorch-default linear bias, BN 1/0."""
        if isinstance(module, nn.Conv2d):
            _kaiming_normal_(module.weight)
            if module.bias is not None:
                _uniform_(module.bias, 0.0, 0.0)
        elif isinstance(module, nn.Linear):
            _kaiming_normal_(module.weight)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight.shape[1])
                _uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            _copy_(module.weight, torch.ones_like(module.weight))
            _copy_(module.bias, torch.zeros_like(module.bias))
            _copy_(module.running_mean, torch.zeros_like(module.running_mean))
            _copy_(module.running_var, torch.ones_like(module.running_var))
            _copy_(module.num_batches_tracked, torch.zeros_like(module.num_batches_tracked))
        elif isinstance(module, NormedLinear):
            module.reset_parameters()


class ResNetCifarModel(ResNetCifarPreTrainedModel):
    """CIFAR ResNet backbone: ``pooler_output`` is the globally average-pooled last stage."""

    def __init__(self, config: ResNetCifarConfig) -> None:
        super().__init__(config)
        w0 = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.num_channels, w0, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_planes = w0
        for i, (n, planes) in enumerate(zip(config.num_blocks, config.widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, config.shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = in_planes
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple[torch.Tensor, ...]:
        """``pixel_values`` ``(B, C, H, W)`` -> last feature map, pooled features ``(B, widths[-1])``."""
        if pixel_values is None or pixel_values.dim() != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"pixel_values must be a (batch, channels, height, width) tensor; got {shape}."
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                f"{self.config.num_channels} (config.num_channels); convert images to RGB."
            )
        output_hidden_states = (
            output_hidden_states
            if output_hidden_states is not None
            else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        x = self.stem(pixel_values)
        hidden = [x] if output_hidden_states else None
        for stage in self.stages:
            x = stage(x)
            if hidden is not None:
                hidden.append(x)
        # LDAM uses avg_pool2d(x, x.size(3)), i.e. global average pooling for square inputs.
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        hidden_states = tuple(hidden) if hidden is not None else None
        if not return_dict:
            return tuple(v for v in (x, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states
        )


class ResNetCifarForImageClassification(ResNetCifarPreTrainedModel):
    """CIFAR ResNet with a classification head; ``forward`` returns ``ImageClassifierOutputWithNoAttention``.

    ``loss`` (when ``labels`` are given) is the mean cross-entropy computed in float32, as the
    transformers image classifiers do for single-label classification; the long-tail losses are
    applied by ``LongTailTrainer`` on ``logits``.
    """

    def __init__(self, config: ResNetCifarConfig) -> None:
        super().__init__(config)
        if config.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1; got {config.num_labels}.")
        self.num_labels = config.num_labels
        self.resnet = ResNetCifarModel(config)
        d = self.resnet.num_features
        self.classifier: nn.Module = (
            NormedLinear(d, config.num_labels, config.logit_scale)
            if config.normed_linear
            else nn.Linear(d, config.num_labels)
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ImageClassifierOutputWithNoAttention | tuple[torch.Tensor, ...]:
        """Logits ``(B, num_labels)``; cross-entropy ``loss`` if ``labels`` ``(B,)`` are given."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.resnet(
            pixel_values, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device).long().view(-1))
        if not return_dict:
            out = (logits,) + (
                (outputs.hidden_states,) if outputs.hidden_states is not None else ()
            )
            return (loss, *out) if loss is not None else out
        return ImageClassifierOutputWithNoAttention(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states
        )


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    AutoConfig.register(ResNetCifarConfig.model_type, ResNetCifarConfig, exist_ok=True)
    AutoModel.register(ResNetCifarConfig, ResNetCifarModel, exist_ok=True)
    AutoModelForImageClassification.register(
        ResNetCifarConfig, ResNetCifarForImageClassification, exist_ok=True
    )


_register_auto_classes()
