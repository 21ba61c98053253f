import importlib

import hf_longtail


def test_version_matches_pyproject():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    assert hf_longtail.__version__ == version


def test_unknown_attribute_raises():
    mod = importlib.import_module("hf_longtail")
    try:
        mod.does_not_exist  # noqa: B018
    except AttributeError as err:
        assert "does_not_exist" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")
