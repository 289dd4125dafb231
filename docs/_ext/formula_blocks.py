"""Shows the indented formulas of docstrings as code blocks, line for line as in the source.

jbn's docstrings set a formula apart from the text by indenting it, as `help()` shows it best:

    Normalizes with given statistics, like `tf.nn.batch_normalization`:

        y = (x - mean) * scale / sqrt(variance + variance_epsilon) + offset

reStructuredText reads such a block as a block quote: one paragraph, its lines joined and
their spaces collapsed. Here the paragraph above it is ended with '::' (rendered as ':' after
a ':', and as nothing after anything else), which makes the block a literal block, in the
docstrings autodoc reads, after napoleon has turned their Args/Returns sections into fields.
An indented block that is markup of its own (a doctest, a list, a directive, a field) is left
as it is, and so is whatever a doctest, a literal block or a code directive already holds.
"""

import re

# The start of a line that reStructuredText reads as markup, not as text.
MARKUP = re.compile(r"(>>>|\.\.(\s|$)|:|[-*+](\s|$)|\d+[.)]\s|#\.\s)")
# Directives whose content is code, not text.
CODE_DIRECTIVE = re.compile(r"\.\. (code-block|code|sourcecode|math|parsed-literal)::")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _introduces_text_block(lines: list[str], index: int) -> bool:
    """Whether `lines[index]` is text followed by a blank line and a more indented block of
    text (which reStructuredText would read as a block quote)."""
    if index + 2 >= len(lines):
        return False
    line, blank, block = lines[index], lines[index + 1], lines[index + 2]
    return (
        bool(line.strip())
        and not line.rstrip().endswith("::")
        and not MARKUP.match(line.strip())
        and not blank.strip()
        and bool(block.strip())
        and _indent(block) > _indent(line)
        and not MARKUP.match(block.strip())
    )


def mark_literal_blocks(lines: list[str]) -> None:
    """Ends with '::' each line that introduces an indented block of text (in place)."""
    code_below = None  # the indentation of the line above the code block being passed over
    in_doctest = False  # a doctest block lasts until a blank line
    for index, line in enumerate(lines):
        stripped = line.strip()
        if in_doctest:
            in_doctest = bool(stripped)
            continue
        if code_below is not None:
            if not stripped or _indent(line) > code_below:
                continue
            code_below = None
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        if _introduces_text_block(lines, index):
            line = line.rstrip()
            lines[index] = line = line + (":" if line.endswith(":") else " ::")
            stripped = line.strip()
        if CODE_DIRECTIVE.match(stripped) or (
            stripped.endswith("::") and not stripped.startswith("..")
        ):
            code_below = _indent(line)


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    mark_literal_blocks(lines)


def setup(app) -> dict:
    # After napoleon (priority 500): its section headers ("Args:") are text until it makes
    # them fields.
    app.connect("autodoc-process-docstring", _process_docstring, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
