"""Config files (configs/*.py): loading one with every problem as one message, and its fields.

A config file is Python whose `get_config()` returns an `ml_collections.ConfigDict` holding
every field of `configs/default.py` (each config starts from it and changes a few). `load` runs
one and says what is wrong in a single line naming the file; `describe_fields` lists the fields
with their values and the config file's comments, for `--help`.

Other command lines load a config file as `train.__main__` does:

    try:
        config = config_files.load(path)
    except config_files.ConfigFileError as error:
        print(f"error: {error}", file=sys.stderr)
"""

from __future__ import annotations

import ast
import importlib.util
import io
import os
import textwrap
import tokenize
import traceback
from collections.abc import Iterator

import ml_collections

# The config every other starts from: the fields a run needs, and their comments.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.py")


class ConfigFileError(Exception):
    """A config file that cannot give a config; the message names the file and the problem."""


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Dotted names of every field, groups included, e.g. 'optimizer', 'optimizer.learning_rate'."""
    for name, value in config.items():
        yield f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from field_names(value, f"{prefix}{name}.")


def _first_line(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"SystemExit (sys.exit({error.code!r}))"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _where(path: str, error: BaseException) -> str:
    """'config file PATH' with ', line N' of the deepest frame of the error in that file."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
    return f"config file {path}" + (f", line {lines[-1]}" if lines else "")


def _run_get_config(path: str, argument: str | None) -> object:
    """What `get_config()` (or `get_config(argument)`) of the file at `path` returns."""
    spec = importlib.util.spec_from_file_location("_jbn_config_file", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigFileError(
            f"config file {path}, line {error.lineno}: syntax error: {error.msg}"
        ) from None
    except (Exception, SystemExit) as error:  # a config file must not end the program
        raise ConfigFileError(
            f"{_where(path, error)}: loading it raised {_first_line(error)}"
        ) from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigFileError(
            f"config file {path} defines no get_config() (see configs/default.py)"
        )
    try:
        return get_config() if argument is None else get_config(argument)
    except (Exception, SystemExit) as error:
        raise ConfigFileError(
            f"{_where(path, error)}: get_config() raised {_first_line(error)}"
        ) from None


def load(spec: str) -> ml_collections.ConfigDict:
    """The config that `get_config()` of a config file returns, checked.

    `spec`: the file's path, optionally followed by ':argument' for `get_config(argument)`, as
    ml_collections' `--config` flag takes it.

    Raises:
      ConfigFileError: the file is missing or not a `.py` file, does not compile, raises (or
        calls sys.exit) while loading or in `get_config()`, has no `get_config()`, returns
        something else than a ConfigDict, or a ConfigDict lacking fields of configs/default.py.
    """
    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigFileError(f"config file {path} does not exist (or is not a file)")
    if not path.endswith(".py"):
        raise ConfigFileError(
            f"config file {path} is not a Python file (.py): a config file defines get_config() "
            "returning an ml_collections.ConfigDict, as configs/default.py does"
        )
    config = _run_get_config(path, argument or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"config file {path}: get_config() returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict" + (" (no return statement?)" if config is None else "")
        )
    if os.path.isfile(DEFAULT_CONFIG) and os.path.abspath(path) != DEFAULT_CONFIG:
        present = set(field_names(config))
        missing = []  # the fields absent, a group once (not each field of it too)
        for field in field_names(_run_get_config(DEFAULT_CONFIG, None)):
            if field not in present and not field.startswith(tuple(f"{m}." for m in missing)):
                missing.append(field)
        if missing:
            shown = ", ".join(missing[:5])
            if len(missing) > 5:
                shown += f" and {len(missing) - 5} more"
            raise ConfigFileError(
                f"config file {path}: get_config() lacks fields every run needs: {shown}; "
                "start from configs/default.py's get_config() and change what differs, as "
                "configs/smoke.py does"
            )
    return config


# ----------------------------------------------------------------------------- --help


def field_comments(source: str) -> dict[str, str]:
    """The comments on the fields a config file's source assigns, by dotted name.

    A field's comment is the one ending its assignment, else the comment lines right above it.
    Assignments are recognised through the names the file gives the config and its groups:
    `config.seed = 0`, `config.model = model = ConfigDict()` then `model.decay = 0.9`.
    """
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    prefixes: dict[str, str] = {}  # variable -> the dotted name of the ConfigDict it holds, + '.'
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Assign):
            continue
        fields = [name for target in node.targets if (name := _dotted(target, prefixes))]
        for target in node.targets:
            if isinstance(target, ast.Name):  # the config itself, or an alias of a group
                prefixes[target.id] = f"{fields[0]}." if fields else ""
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        above, line = [], node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        comment = trailing[-1] if trailing else " ".join(above)
        for field in fields:
            if comment:
                found[field] = comment
    return found


def _dotted(target: ast.expr, prefixes: dict[str, str]) -> str | None:
    """'model.decay' for `model.decay` when `model` holds the group 'model'; else None."""
    attributes = []
    while isinstance(target, ast.Attribute):
        attributes.insert(0, target.attr)
        target = target.value
    if not attributes or not isinstance(target, ast.Name) or target.id not in prefixes:
        return None
    return prefixes[target.id] + ".".join(attributes)


def _comments_of(path: str) -> dict[str, str]:
    try:
        with open(path) as file:
            return field_comments(file.read())
    except (OSError, SyntaxError, ValueError):
        return {}


def describe_fields(config: ml_collections.ConfigDict, path: str, width: int = 100) -> str:
    """One line per field, 'name = value', each followed by its comment (indented, wrapped).

    The comments are the file's at `path`, else configs/default.py's (every config starts from
    it), so a config that only changes values still shows what each field means.
    """
    comments = {**_comments_of(DEFAULT_CONFIG), **_comments_of(path)}
    lines = []
    for name in field_names(config):
        value = _get(config, name)
        if isinstance(value, ml_collections.ConfigDict):
            if name in comments:
                lines.append(f"  {name}: {comments[name]}")
            continue
        lines.append(f"  {name} = {value!r}")
        if name in comments:
            lines += textwrap.wrap(
                comments[name], width, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines)


def _get(config: ml_collections.ConfigDict, name: str) -> object:
    for part in name.split("."):
        config = config[part]
    return config
