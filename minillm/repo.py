"""Files of the course repository that live outside the package: stored benchmark results, exercise notebooks.

In a checkout they are read where they are. A wheel (``pip install minillm-course``, as a notebook's first cell
does in Colab) carries copies under ``minillm/_repo/`` (see setup.py), so a notebook shows the same stored
results and ``python -m minillm.course grade`` finds the same pristine exercises wherever the course is installed.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent


def in_checkout() -> bool:
    """Is this package imported from a course checkout (the folder above it holds notebooks/ and solutions/)?"""
    return (CHECKOUT / "solutions").is_dir() and (CHECKOUT / "notebooks").is_dir()


def repo_path(relative: str) -> Path:
    """`relative` (e.g. "benchmarks/results") in the checkout, else in the copy the wheel ships (may not exist)."""
    return (CHECKOUT if in_checkout() else PACKAGE_DIR / "_repo") / relative


def stored_results(topic: str) -> list[Path]:
    """The committed `python -m minillm.bench <topic>` results (one JSON per device), sorted by name."""
    return sorted(repo_path("benchmarks/results").glob(f"{topic}-*.json"))
