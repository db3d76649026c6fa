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
        series = self._series
        for metric in self._registry.collect():
            samples = metric.samples
            if not _plain(metric, samples):
                lines.append(generate_latest(_One(metric)).decode("utf-8"))
                continue
            lines.append(self._head(metric))
            for sample in samples:
                prefix = series.get((sample.name, tuple(sample.labels.items())))
                if prefix is None:
                    prefix = self._prefix(metric, sample)
                lines.append(f"{prefix}{_go_float(sample.value)}\n")
        return "".join(lines).encode("utf-8")

    def _head(self, metric: Metric) -> str:
        key = (metric.name, metric.type, metric.documentation, metric.unit)
        head = self._heads.get(key)
        if head is None:
            empty = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            head = generate_latest(_One(empty)).decode("utf-8")
            self._keep(self._heads, key, head)
        return head

    def _prefix(self, metric: Metric, sample: Sample) -> str:
        """The text of `sample`'s series, rendered by the library alone and kept."""
        alone = Metric(metric.name, metric.documentation, metric.type, metric.unit)
        alone.samples = [Sample(sample.name, sample.labels, _PLACEHOLDER)]
        text, head = generate_latest(_One(alone)).decode("utf-8"), self._head(metric)
        value = f" {_go_float(_PLACEHOLDER)}\n"
        if not (text.startswith(head) and text.endswith(value)):  # the library changed
            raise RuntimeError(f"unexpected exposition of one sample: {text!r}")
        prefix = text[len(head) : -len(value) + 1]  # the space before the value kept
        self._keep(self._series, (sample.name, tuple(sample.labels.items())), prefix)
        return prefix

    @staticmethod
    def _keep(cache: dict[object, str], key: object, text: str) -> None:
        if len(cache) >= MAX_KEPT:
            cache.clear()
        cache[key] = text


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
