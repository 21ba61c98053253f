"""``python -m hf_longtail.hub``: see :mod:`hf_longtail.hub.cli`."""

import sys

from hf_longtail.hub.cli import main

sys.exit(main())
