"""The examples in jbn's docstrings run, as doctests, and print what they say; README's run too.

Each public module's docstrings are collected by `doctest` (the `>>>` examples the API
reference shows); a module listed in EXAMPLES must hold at least that many examples, so that an
example rewritten as plain text (no longer run) fails here.
"""

import doctest
import importlib
import pathlib
import re

import pytest

# Module -> the number of docstrings with examples it holds at least.
EXAMPLES = {
    "jbn.module": 1,
    "jbn.nnx": 1,
    "jbn.equinox": 1,
    "jbn.precise_bn": 1,
}
MODULES = sorted(
    {
        *EXAMPLES,
        "jbn",
        "jbn.averages",
        "jbn.fold",
        "jbn.linen",
        "jbn.normalization",
        "jbn.renorm",
        "jbn.running",
        "jbn.stats",
    }
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [test for test in finder.find(module, name) if test.examples]
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} failing examples in {name} (output above)"
    assert len(tests) >= EXAMPLES.get(name, 0), f"{name} lost its docstring examples"


def readme_examples() -> list[str]:
    """The Python code blocks of README.md, in order."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", readme, flags=re.M | re.S)


def test_readme_examples_run():
    examples = readme_examples()
    assert len(examples) >= 3  # the core, linen and NNX
    namespace = {}
    for example in examples:  # one namespace: each example builds on the ones before
        exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (32, 8, 8, 16)
    assert type(namespace["flax_model"].layers[1]).__module__ == "jbn.nnx"
