"""Worked examples written as ```python blocks in an exercise's markdown, each `# -> text` line giving the output
of the expression above it: parsed here and recomputed with minillm's references (chapters 07 and 08).

Not a test module itself (pytest collects only tests/answers/ch*.py).
"""

import re
from pathlib import Path

from minillm.course import read_notebook

EXPECTED = "# -> "


def worked_examples(markdown: str) -> list[tuple[str, str]]:
    """(code, expected output) pairs from the ```python blocks of a markdown cell: each `# -> text` line gives the
    output of the expression on the line above it, after the lines before it ran."""
    pairs = []
    for block in re.findall(r"```python\n(.*?)```", markdown, flags=re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith(EXPECTED):
                pairs.append(("\n".join(lines[:i]), line[len(EXPECTED):]))
    return pairs


def run_example(code: str, namespace: dict) -> str:
    """The printed value of the code's last expression, run in a copy of `namespace` (the references)."""
    *statements, last = [line for line in code.splitlines() if line.strip() and not line.startswith(EXPECTED)]
    namespace = dict(namespace)
    exec("\n".join(statements), namespace)
    return str(eval(last, namespace))


def check_worked_examples(solution: Path, chapter: int, numbers: list[str], references: dict) -> None:
    """Every exercise of the solution notebook has a worked example, and each is what the references give."""
    found = {}
    for cell in read_notebook(solution).cells:
        match = re.search(rf"^## Exercise ({chapter}\.\d+)", cell.source, flags=re.M)
        if cell.cell_type == "markdown" and match:
            found[match[1]] = worked_examples(cell.source)
    assert sorted(found) == numbers, sorted(found)
    for number, pairs in found.items():
        assert pairs, f"the markdown of exercise {number} has no worked example (a ```python block with '# -> ')"
        for code, expected in pairs:
            got = run_example(code, references)
            assert got == expected, f"exercise {number}: the reference gives {got!r} for\n{code}"
