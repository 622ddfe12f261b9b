"""A load generator for an OpenAI-compatible server: Poisson arrivals, streamed responses, latency percentiles.

Exercise 12.3 rebuilds ``poisson_arrivals`` and ``percentile``.
"""

from __future__ import annotations

import math

import numpy as np


def poisson_arrivals(rate: float, num_requests: int, rng: np.random.Generator) -> list[float]:
    """Arrival times (seconds from 0, increasing) of a Poisson process of `rate` requests/s: the gaps between
    arrivals are independent and exponential with mean 1 / rate, so requests come in random bursts, as users do."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive, finite number of requests per second, got {rate!r}")
    gaps = rng.exponential(1.0 / rate, size=num_requests)  # (num_requests,)
    return np.cumsum(gaps).tolist()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100  # fractional index into the sorted values
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
