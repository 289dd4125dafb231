"""Sphinx configuration of jbn's documentation (`make docs`; see docs/guides/development.md)."""

import os
import sys

# The checkout's jbn, train and configs come first, whatever is installed, and the local
# extensions are importable.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))
# Code cells run in a kernel started in each page's folder: give it the checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [ROOT, os.path.join(ROOT, "docs", "_ext"), os.environ.get("PYTHONPATH")])
)

import jbn  # noqa: E402

project = "jbn"
author = "the jbn authors"
copyright = "the jbn authors"
release = version = jbn.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_copybutton",
    "sphinx_design",
    "coverage_check",
    "formula_blocks",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}

# Docstrings are Google style and write code in single backticks, as Markdown does.
default_role = "literal"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# NamedTuple fields have entries of their own; the class docstring's Attributes are fields.
napoleon_use_ivar = True
autosummary_generate = True
# Signatures read as calls; the types go to the parameters' descriptions.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
python_use_unqualified_type_names = True
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Intersphinx needs the network; the build must run offline, so no inventories are fetched.
intersphinx_mapping = {}

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
# Every code cell runs at each build; a cell that raises fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
# The results pages print tables as Markdown.
nb_render_markdown_format = "myst"

html_theme = "sphinx_book_theme"
html_title = f"jbn {release}"
html_theme_options = {
    "show_toc_level": 2,
    "repository_url": "https://github.com/jbn-project/jbn",
    "use_repository_button": False,
}
html_static_path = []
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# The public modules whose every name in `__all__` must have an API entry (coverage_check).
coverage_modules = ["jbn", "jbn.linen", "jbn.nnx", "jbn.equinox", "jbn.running", "jbn.precise_bn"]
