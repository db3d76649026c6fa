"""What `make bench-scale` measured at one size (`Figures`), and the table of both sizes."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

RSS_TARGET_KB: Final = 200 * 1024
REPORTS: Final = {  # name -> the command's words (each run with --json)
    "providers": ("providers",),
    "clients list": ("clients", "list"),
    "orders held": ("orders", "held"),
}
HELP: Final = "--help"


@dataclass
class Figures:
    """One size's measurements; seconds unless named otherwise. A list holds one value per
    round (or run): the table shows its median."""

    orders: int
    active: int
    filled: float = 0.0
    status_p50s: list[float] = field(default_factory=list)
    status_answers: int = 0  # requests timed for those p50s, all rounds
    status100_rates: list[float] = field(default_factory=list)
    report_runs: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in [*REPORTS, HELP]}
    )
    healthz_p50: float = 0.0
    metrics_p50: float = 0.0
    start_ups: list[float] = field(default_factory=list)
    sync_seconds: float = 0.0
    sync_changes: int = 0
    rss_ready: int = 0  # kB, VmRSS once /healthz answered (the pass has just begun)
    rss_peak: int = 0  # kB, the highest VmRSS sampled during the pass
    hwm: int = 0  # kB, VmHWM at the end of the pass
    problems: list[str] = field(default_factory=list)

    @property
    def status_p50(self) -> float:
        return statistics.median(self.status_p50s)

    @property
    def status100_rate(self) -> float:
        return statistics.median(self.status100_rates)

    def report(self, name: str) -> float:
        return statistics.median(self.report_runs[name])

    @property
    def start_up(self) -> float:
        return statistics.median(self.start_ups)


@dataclass(frozen=True)
class Row:
    figure: str
    values: tuple[str, str]
    ratio: str
    target: str
    met: str


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def _count(number: int) -> str:
    return f"{number:,}"


def _per_second(rate: float) -> str:
    return f"{rate:,.0f}/s"


def _both_under(limit: float) -> Callable[[Any, Any, float], bool]:
    return lambda low, high, _ratio: max(low, high) < limit


def _row(
    small: Figures,
    large: Figures,
    figure: str,
    read: Callable[[Figures], Any],
    show: Callable[[Any], str],
    target: str = "",
    met: Callable[[Any, Any, float], bool] | None = None,
    *,
    compare: bool = True,
) -> Row:
    low, high = read(small), read(large)
    ratio = high / low if isinstance(low, int | float) and low else math.nan
    shown = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
    verdict = "" if met is None else ("yes" if met(low, high, ratio) else "no")
    return Row(figure, (show(low), show(high)), shown if compare else "", target, verdict)


def rows(small: Figures, large: Figures, *, rounds: int, probes: int, starts: int) -> list[Row]:
    """The table: each figure at both sizes, the ratio large / small, the target, met."""
    table: list[Row] = []

    def add(
        figure: str,
        read: Callable[[Figures], Any],
        show: Callable[[Any], str],
        target: str = "",
        met: Callable[[Any, Any, float], bool] | None = None,
        *,
        compare: bool = True,
    ) -> None:
        """`met` gets (small's value, large's value, their ratio); `compare`: print the
        ratio (not for a difference of two noisy figures)."""
        table.append(_row(small, large, figure, read, show, target, met, compare=compare))

    table += _size_rows(small, large)
    add(
        f"status, 1 ID: p50 (1 conn., median of {rounds})",
        lambda f: f.status_p50,
        _ms,
        "within 2x",
        lambda _low, _high, ratio: ratio <= 2,
    )
    add("  requests timed", lambda f: f.status_answers, _count)
    add(
        f"status, 100 IDs: rate (64 conn., median of {rounds})",
        lambda f: f.status100_rate,
        _per_second,
        "within 1.5x (>= 0.67x)",
        lambda _low, _high, ratio: ratio >= 1 / 1.5,
    )
    for name in REPORTS:
        add(
            f"smm-router {name} --json (wall)",
            lambda f, n=name: f.report(n),
            _s,
            "< 1 s",
            _both_under(1.0),
        )
        add("  beyond --help", lambda f, n=name: f.report(n) - f.report(HELP), _s, compare=False)
    add("smm-router --help (wall, for scale)", lambda f: f.report(HELP), _s)
    add(f"/healthz: p50 of {probes}", lambda f: f.healthz_p50, _ms, "< 20 ms", _both_under(0.020))
    add(f"/metrics: p50 of {probes}", lambda f: f.metrics_p50, _ms, "< 20 ms", _both_under(0.020))
    add(
        f"start-up to /healthz (median of {starts})",
        lambda f: f.start_up,
        _s,
        "no scan: flat (within 1.25x)",
        lambda _low, _high, ratio: ratio <= 1.25,
    )
    return table + _sync_rows(small, large)


def sync_rows(small: Figures, large: Figures) -> list[Row]:
    """The sizes and the sync's part of the table: all that `--sync-only` measures."""
    return _size_rows(small, large) + _sync_rows(small, large)


def _size_rows(small: Figures, large: Figures) -> list[Row]:
    return [
        _row(small, large, "orders", lambda f: f.orders, _count),
        _row(small, large, "  of them active", lambda f: f.active, _count),
        _row(small, large, "fill (SQL, one transaction)", lambda f: f.filled, _s),
    ]


def _sync_rows(small: Figures, large: Figures) -> list[Row]:
    table: list[Row] = []

    def add(
        figure: str,
        read: Callable[[Figures], Any],
        show: Callable[[Any], str],
        target: str = "",
        met: Callable[[Any, Any, float], bool] | None = None,
    ) -> None:
        table.append(_row(small, large, figure, read, show, target, met))

    add("sync pass over the active orders", lambda f: f.sync_seconds, _s)
    add("  statuses it changed", lambda f: f.sync_changes, _count)
    add("sync RSS: VmRSS at /healthz (pass begun)", lambda f: f.rss_ready, _mb)
    add(
        "sync RSS: peak VmRSS sampled",
        lambda f: f.rss_peak,
        _mb,
        "<= 200 MB",
        _both_under(RSS_TARGET_KB + 1),
    )
    add(
        "sync RSS: VmHWM at the pass's end",
        lambda f: f.hwm,
        _mb,
        "<= 200 MB",
        _both_under(RSS_TARGET_KB + 1),
    )
    return table


def print_rows(table: list[Row], sizes: tuple[int, int]) -> None:
    header = ("figure", f"{sizes[0]:,} orders", f"{sizes[1]:,} orders", "ratio", "target", "met")
    cells = [header, *((r.figure, *r.values, r.ratio, r.target, r.met) for r in table)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
