"""Reading a kernel timeline: where the GPU sat idle between kernels, and the largest such gap.

Teaches: the first question to ask a profile of a decode step. A small model's kernels finish in microseconds, and
the GPU then waits for the CPU to launch the next one (Python, the framework's dispatch, a launch call each): the
gaps between kernels, not the kernels, are the step's time. CUDA graphs and fused kernels exist to close them.
``torch.profiler`` (and Nsight Systems) give each kernel a start and a duration; on one stream kernels run in launch
order, but the table may come unordered and, across streams or with a profiler's rounding, kernels can overlap or
touch. So the idle time before a kernel is measured from the end of the latest-ending kernel started before it, not
from the previous row's end: a long kernel that is still running hides the short ones that started after it.

Example, kernels (name, start, duration) in µs: a (0, 10), b (2, 3), c (12, 1), d (16, 1). b ends at 5 but a runs
until 10, so c follows a after 2 µs idle, and d follows c after 3: ``largest_gap`` is ("c", "d", 3.0).

``minillm.fast.profiler`` builds its step summary on these functions; exercise 10.4 rewrites ``largest_gap``.
"""

from __future__ import annotations

import pandas as pd

COLUMNS = ("name", "start_us", "dur_us")


def kernel_gaps(events: pd.DataFrame) -> pd.DataFrame:
    """The idle time before each kernel but the first, in start order.

    events: one row per kernel, columns ``name``, ``start_us``, ``dur_us`` (any order, other columns ignored).
    Returns one row per kernel after the first: ``before`` (the kernel ending latest among those started earlier;
    the first such on ties), ``after`` (this kernel), ``idle_from_us`` (that latest end) and ``gap_us``
    (``max(0, start - latest end)``: overlapping or touching kernels leave no gap). Kernels that start together keep
    their order in ``events``.
    """
    missing = [c for c in COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events needs the columns {list(COLUMNS)}; missing {missing} (has {list(events.columns)})")
    if len(events) < 2:
        raise ValueError(f"a gap needs at least 2 kernels, got {len(events)}")
    ordered = events.sort_values("start_us", kind="stable")  # a new frame: the caller's stays as it was
    rows = []
    latest_name, latest_end = None, float("-inf")
    for name, start, dur in zip(ordered["name"], ordered["start_us"], ordered["dur_us"]):
        if latest_name is not None:
            rows.append((latest_name, name, latest_end, max(0.0, float(start) - latest_end)))
        if start + dur > latest_end:  # strictly later: the first kernel to reach an end keeps it
            latest_name, latest_end = name, float(start + dur)
    return pd.DataFrame(rows, columns=["before", "after", "idle_from_us", "gap_us"])


def largest_gap(events: pd.DataFrame) -> tuple[str, str, float]:
    """(kernel before, kernel after, gap in µs) of the longest idle time in ``events`` (see ``kernel_gaps``); the
    first in start order on ties, with a gap of 0.0 when kernels never leave the GPU idle."""
    gaps = kernel_gaps(events)
    row = gaps.loc[gaps["gap_us"].idxmax()]  # idxmax: the first maximum
    return str(row["before"]), str(row["after"]), float(row["gap_us"])
