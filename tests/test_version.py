"""`jbn.__version__` and pyproject.toml's version cannot disagree: pyproject reads it from
jbn/__init__.py (setuptools' dynamic `attr`, which parses the literal without importing jbn)."""

from __future__ import annotations

import ast
import pathlib
import tomllib

from packaging.version import Version

import jbn

ROOT = pathlib.Path(__file__).parents[1]


def test_pyproject_takes_its_version_from_jbn():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jbn.__version__"}
    # setuptools resolves the attr statically: a string literal assigned at the top level.
    module = ast.parse((ROOT / "jbn" / "__init__.py").read_text())
    literals = [
        node.value.value
        for node in module.body
        if isinstance(node, ast.Assign)
        and [target.id for target in node.targets if isinstance(target, ast.Name)]
        == ["__version__"]
        and isinstance(node.value, ast.Constant)
    ]
    assert literals == [jbn.__version__]
    assert str(Version(jbn.__version__)) == jbn.__version__  # PEP 440, as the wheel needs
