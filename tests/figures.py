"""Counts the hardening tests gather (files tried, 5xx seen, ...), printed at the end of the run for
the README's reliability section."""

from __future__ import annotations

from collections import Counter

FIGURES: Counter[str] = Counter()


def record(**counts: int) -> None:
    FIGURES.update(counts)
