"""Shows a committed benchmark result (`benchmarks/results/NAME.md|png`) in a docs page.

The results pages call `show` in code cells, so the site prints the files the benchmarks wrote,
never a copy: rerun the command, commit its outputs, rebuild.
"""

import pathlib

from IPython.display import Image, Markdown, display

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def show(name: str, command: str) -> None:
    """Displays the command, then `NAME.md` (its `# ...` lines, the machine and date of each run,
    as plain lines, not headings), then `NAME.png` if there is one."""
    lines = (RESULTS / f"{name}.md").read_text().splitlines()
    out = [f"**Command:** `{command}`  ", f"**File:** `benchmarks/results/{name}.md`", ""]
    for line in lines:
        if line.startswith("# "):
            out += ["", f"*Recorded:* `{line[2:].strip()}`", ""]
        else:
            out.append(line)
    display(Markdown("\n".join(out)))
    png = RESULTS / f"{name}.png"
    if png.exists():
        display(Image(filename=str(png)))
