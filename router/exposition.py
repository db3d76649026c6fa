"""The text a `/metrics` scrape answers: prometheus_client's `generate_latest`, byte for byte,
at a fraction of its cost.

`generate_latest` escapes and validates every label name and value of every line on every
scrape, about 20 µs a line here; a router's series are the same from one scrape to the next
(providers x actions x buckets: about 140 lines per provider), only their values move. So an
Exposition asks the library once for each series' text (its name and labels), and for each
metric's HELP and TYPE lines, by rendering that one sample or that one metric alone with
`generate_latest` itself, and keeps them; each scrape then writes only the values, with the
library's own float formatting. A metric with anything else on its samples (a timestamp, an
exemplar, a native histogram, OpenMetrics' `_created`/`_gsum`/`_gcount`) is rendered whole by
the library, as it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

# Series texts kept at most: the router's metrics have bounded labels (providers, actions,
# outcomes), so this bounds a bug, never a fleet. Past it the cache starts again.
MAX_KEPT: Final = 50_000
# The samples that `generate_latest` moves into gauges of their own at the end of a metric.
_OPENMETRICS_SUFFIXES: Final = ("_created", "_gsum", "_gcount")
_PLACEHOLDER: Final = 0.0  # the value a series is rendered with, to cut its text from the line
# A value as the library writes it ("+Inf", "1e-07"): its own function, which it leaves untyped.
_go_float: Final[Callable[[float], str]] = floatToGoString


class _Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _One:
    """A collector of one metric, for `generate_latest` to render alone."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]


class Exposition:
    """Renders `registry` in the Prometheus text format, as `generate_latest(registry)` does."""

    def __init__(self, registry: _Collector) -> None:
        self._registry = registry
        # Keyed by (sample name, label items) and by (metric name, type, help) respectively.
        self._series: dict[object, str] = {}  # "name{labels} " of each series
        self._heads: dict[object, str] = {}  # "# HELP ...\n# TYPE ...\n" of each metric

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self._registry.collect():
            kept = self._lines(metric) if _plain(metric, metric.samples) else None
            lines.extend(kept if kept is not None else [_whole(metric)])
        return "".join(lines).encode("utf-8")

    def _lines(self, metric: Metric) -> list[str] | None:
        """`metric`'s lines from the kept texts (those it lacks made now); None when one of
        its series cannot be kept (see _prefix)."""
        series = self._series
        lines = [self._head(metric)]
        for sample in metric.samples:
            prefix = series.get((sample.name, tuple(sample.labels.items())))
            if prefix is None and (prefix := self._prefix(metric, sample)) is None:
                return None
            lines.append(f"{prefix}{_go_float(sample.value)}\n")
        return lines

    def _head(self, metric: Metric) -> str:
        key = (metric.name, metric.type, metric.documentation, metric.unit)
        head = self._heads.get(key)
        if head is None:
            head = _whole(Metric(metric.name, metric.documentation, metric.type, metric.unit))
            self._keep(self._heads, key, head)
        return head

    def _prefix(self, metric: Metric, sample: Sample) -> str | None:
        """The text of `sample`'s series, rendered by the library alone and kept; None if the
        library writes it in a way this cannot cut (a version that changed its layout): the
        metric is then rendered whole by the library, as exactly, only not as fast."""
        alone = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        alone.samples = [Sample(sample.name, sample.labels, _PLACEHOLDER)]
        text, head = _whole(alone), self._head(metric)
        value = f" {_go_float(_PLACEHOLDER)}\n"
        if not (text.startswith(head) and text.endswith(value)):
            return None
        prefix = text[len(head) : -len(value) + 1]  # the space before the value kept
        self._keep(self._series, (sample.name, tuple(sample.labels.items())), prefix)
        return prefix

    @staticmethod
    def _keep(cache: dict[object, str], key: object, text: str) -> None:
        if len(cache) >= MAX_KEPT:
            cache.clear()
        cache[key] = text


def _whole(metric: Metric) -> str:
    """`metric` as the library renders it."""
    return generate_latest(_One(metric)).decode("utf-8")


def _plain(metric: Metric, samples: list[Sample]) -> bool:
    """Every line of `metric` is its series' text and its value, and nothing else."""
    moved = {metric.name + suffix for suffix in _OPENMETRICS_SUFFIXES}
    return not any(
        sample.name in moved
        or sample.timestamp is not None
        or sample.exemplar is not None
        or sample.native_histogram is not None
        for sample in samples
    )
