"""Fails the build when a public name of jbn has no entry in the API reference.

The public names are `__all__` of each module in the config value `coverage_modules`
(submodules listed there are pages of their own, not entries). Once every page is read, each
name must be a documented Python object of the module that exports it (`jbn.fused_batch_norm`,
not the `jbn.normalization.fused_batch_norm` it is defined as), on a page the table of contents
reaches; the missing ones are reported together and the build stops.
"""

import importlib
import types

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        raise ExtensionError(f"coverage_check: {module_name} has no __all__")
    return [name for name in names if not isinstance(getattr(module, name), types.ModuleType)]


def missing_entries(app: Sphinx, documented: set[str]) -> list[str]:
    return [
        f"{module_name}.{name}"
        for module_name in app.config.coverage_modules
        for name in public_names(module_name)
        if f"{module_name}.{name}" not in documented
    ]


def reachable_docs(env) -> set[str]:
    """The documents the table of contents reaches from the root page (a stub autosummary left
    behind for a name no page lists any more is not one of them)."""
    reached, todo = set(), [env.config.root_doc]
    while todo:
        docname = todo.pop()
        if docname not in reached:
            reached.add(docname)
            todo.extend(env.toctree_includes.get(docname, ()))
    return reached


def check(app: Sphinx, env) -> None:
    reached = reachable_docs(env)
    documented = {
        name for name, entry in env.get_domain("py").objects.items() if entry.docname in reached
    }
    missing = missing_entries(app, documented)
    if missing:
        raise ExtensionError(
            "these public names have no entry in the API reference (add them to a page in "
            "docs/api/): " + ", ".join(missing)
        )


def setup(app: Sphinx) -> dict:
    app.add_config_value("coverage_modules", [], "env")
    app.connect("env-check-consistency", check)
    return {"version": "1", "parallel_read_safe": True}
