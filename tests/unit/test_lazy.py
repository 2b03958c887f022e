"""A package's names load on first use (blocktrail/lazy.py); a name it does not have is an
AttributeError, as for any module."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_a_name_loads_its_module_once_and_only_then() -> None:
    script = ("import sys, blocktrail.repo as r\n"
              "assert 'blocktrail.repo.repository' not in sys.modules\n"
              "first = r.Repository\n"
              "assert 'blocktrail.repo.repository' in sys.modules\n"
              "assert r.Repository is first and 'Repository' in vars(r)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.mark.parametrize("package", ["blocktrail.repo", "blocktrail.disk", "blocktrail.tracking"])
def test_an_unknown_name_is_an_attribute_error(package: str) -> None:
    module = __import__(package, fromlist=["_"])
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        module.Nothing  # noqa: B018
    assert not hasattr(module, "Nothing")
