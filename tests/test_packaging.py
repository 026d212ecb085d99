"""The installed distribution holds every package of the tree, under the sglang_duet namespace only."""
from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_dir_is_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapping = tool["package-dir"]
    # every listed package resolves to a folder with an __init__.py
    for pkg in listed:
        parent = next(p for p in sorted(mapping, key=len, reverse=True) if pkg == p or pkg.startswith(p + "."))
        rel = os.path.join(mapping[parent], *pkg[len(parent):].strip(".").split(".")) if pkg != parent else mapping[parent]
        assert os.path.isfile(os.path.join(ROOT, rel, "__init__.py")), pkg
    # and every package folder under the mapped roots is listed
    for name, rel in mapping.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, rel)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                sub = os.path.relpath(dirpath, os.path.join(ROOT, rel))
                pkg = name if sub == "." else name + "." + sub.replace(os.sep, ".")
                assert pkg in listed, f"{pkg} ({dirpath}) is missing from pyproject's packages"
    assert all(p.startswith("sglang_duet") for p in listed), "no generic top-level names in site-packages"
