"""Long-tailed versions of any image-classification dataset, transforms and samplers.

Knows nothing of losses, the Trainer or the Hub helpers. Main entry points:

- :func:`load_long_tailed` -- a source (``"digits"``, a Hub id, a local folder, a
  ``save_to_disk`` folder, ImageNet-LT / Places-LT / iNaturalist-2018 split files) -> a
  ``DatasetDict`` with a long-tailed ``train`` and the untouched evaluation split(s);
- :func:`make_long_tailed`, :func:`long_tailed_counts`, :func:`class_counts`,
  :func:`longtail_record` -- the long-tail builder and its recorded provenance;
- :func:`detect_columns`, :func:`ensure_class_label` -- column detection and label conversion;
- :func:`build_transforms`, :func:`apply_transforms`, :func:`collate_fn`, :class:`MixupCollator`
  -- feeding a model (``on_bad_image="raise"|"skip"`` for unreadable files; :func:`find_bad_images`;
  :func:`preflight_splits` / :func:`check_images`, a cheap check of every split before training);
- :class:`ClassAwareSampler` -- class-balanced / square-root / progressive sampling under DDP;
- :func:`pixel_dataset`, :class:`PixelStoreDataset` -- the pixel-cache fast path (decode once
  into a uint8 store, augment whole batches with a per-batch generator).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from hf_longtail.data.collate import MixupCollator, PrecollatedBatch, collate_fn
    from hf_longtail.data.columns import (
        detect_columns,
        detect_image_column,
        detect_label_column,
        ensure_class_label,
        ensure_image_feature,
        label_array,
    )
    from hf_longtail.data.pixel_store import (
        PIXEL_CACHE_MODES,
        PixelStoreDataset,
        build_pixel_store,
        pixel_dataset,
    )
    from hf_longtail.data.preflight import check_images, preflight_splits
    from hf_longtail.data.profiles import PROFILES, long_tailed_counts, validate_imbalance_factor
    from hf_longtail.data.samplers import (
        SAMPLING_MODES,
        BatchSeededSampler,
        ClassAwareSampler,
        SeededIndex,
        build_class_aware_sampler,
        create_sampler,
        sampling_distribution,
    )
    from hf_longtail.data.sources import (
        PROTOCOLS,
        SplitFileError,
        load_digits_dataset,
        load_long_tailed,
        load_protocol,
        load_split_file,
    )
    from hf_longtail.data.subsampling import (
        class_counts,
        construction_facts,
        heldout_split_indices,
        long_tailed_indices,
        longtail_record,
        make_long_tailed,
        source_rows,
        stratified_split_indices,
        validation_record,
        write_longtail_record,
    )
    from hf_longtail.data.transforms import (
        ON_BAD_IMAGE,
        BadImageError,
        apply_transforms,
        bad_image_count,
        build_transforms,
        cifar_transforms,
        find_bad_images,
        select_transforms,
        to_rgb,
        transforms_from_image_processor,
        transforms_from_timm,
        with_transforms,
    )

# Names are imported on first access (PEP 562) so that e.g. the samplers or the long-tail
# builder do not pay for importing torchvision / timm.
_EXPORTS: dict[str, str] = {
    "BadImageError": "hf_longtail.data.transforms",
    "BatchSeededSampler": "hf_longtail.data.samplers",
    "ClassAwareSampler": "hf_longtail.data.samplers",
    "MixupCollator": "hf_longtail.data.collate",
    "ON_BAD_IMAGE": "hf_longtail.data.transforms",
    "PROFILES": "hf_longtail.data.profiles",
    "PROTOCOLS": "hf_longtail.data.sources",
    "SAMPLING_MODES": "hf_longtail.data.samplers",
    "PIXEL_CACHE_MODES": "hf_longtail.data.pixel_store",
    "PixelStoreDataset": "hf_longtail.data.pixel_store",
    "PrecollatedBatch": "hf_longtail.data.collate",
    "SeededIndex": "hf_longtail.data.samplers",
    "build_pixel_store": "hf_longtail.data.pixel_store",
    "pixel_dataset": "hf_longtail.data.pixel_store",
    "SplitFileError": "hf_longtail.data.sources",
    "apply_transforms": "hf_longtail.data.transforms",
    "bad_image_count": "hf_longtail.data.transforms",
    "build_class_aware_sampler": "hf_longtail.data.samplers",
    "build_transforms": "hf_longtail.data.transforms",
    "cifar_transforms": "hf_longtail.data.transforms",
    "class_counts": "hf_longtail.data.subsampling",
    "construction_facts": "hf_longtail.data.subsampling",
    "collate_fn": "hf_longtail.data.collate",
    "create_sampler": "hf_longtail.data.samplers",
    "detect_columns": "hf_longtail.data.columns",
    "detect_image_column": "hf_longtail.data.columns",
    "detect_label_column": "hf_longtail.data.columns",
    "ensure_class_label": "hf_longtail.data.columns",
    "ensure_image_feature": "hf_longtail.data.columns",
    "find_bad_images": "hf_longtail.data.transforms",
    "heldout_split_indices": "hf_longtail.data.subsampling",
    "label_array": "hf_longtail.data.columns",
    "load_digits_dataset": "hf_longtail.data.sources",
    "load_long_tailed": "hf_longtail.data.sources",
    "load_protocol": "hf_longtail.data.sources",
    "load_split_file": "hf_longtail.data.sources",
    "check_images": "hf_longtail.data.preflight",
    "preflight_splits": "hf_longtail.data.preflight",
    "long_tailed_counts": "hf_longtail.data.profiles",
    "long_tailed_indices": "hf_longtail.data.subsampling",
    "longtail_record": "hf_longtail.data.subsampling",
    "make_long_tailed": "hf_longtail.data.subsampling",
    "sampling_distribution": "hf_longtail.data.samplers",
    "select_transforms": "hf_longtail.data.transforms",
    "source_rows": "hf_longtail.data.subsampling",
    "stratified_split_indices": "hf_longtail.data.subsampling",
    "to_rgb": "hf_longtail.data.transforms",
    "transforms_from_image_processor": "hf_longtail.data.transforms",
    "transforms_from_timm": "hf_longtail.data.transforms",
    "validate_imbalance_factor": "hf_longtail.data.profiles",
    "validation_record": "hf_longtail.data.subsampling",
    "with_transforms": "hf_longtail.data.transforms",
    "write_longtail_record": "hf_longtail.data.subsampling",
}

__all__ = [
    "ON_BAD_IMAGE",
    "PIXEL_CACHE_MODES",
    "PROFILES",
    "PROTOCOLS",
    "SAMPLING_MODES",
    "BadImageError",
    "BatchSeededSampler",
    "ClassAwareSampler",
    "MixupCollator",
    "PixelStoreDataset",
    "PrecollatedBatch",
    "SeededIndex",
    "SplitFileError",
    "apply_transforms",
    "bad_image_count",
    "build_class_aware_sampler",
    "build_pixel_store",
    "build_transforms",
    "check_images",
    "cifar_transforms",
    "class_counts",
    "collate_fn",
    "construction_facts",
    "create_sampler",
    "detect_columns",
    "detect_image_column",
    "detect_label_column",
    "ensure_class_label",
    "ensure_image_feature",
    "find_bad_images",
    "heldout_split_indices",
    "label_array",
    "load_digits_dataset",
    "load_long_tailed",
    "load_protocol",
    "load_split_file",
    "long_tailed_counts",
    "long_tailed_indices",
    "longtail_record",
    "make_long_tailed",
    "pixel_dataset",
    "preflight_splits",
    "sampling_distribution",
    "select_transforms",
    "source_rows",
    "stratified_split_indices",
    "to_rgb",
    "transforms_from_image_processor",
    "transforms_from_timm",
    "validate_imbalance_factor",
    "validation_record",
    "with_transforms",
    "write_longtail_record",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_longtail.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
