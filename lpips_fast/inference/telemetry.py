"""Counters, gauges and histograms kept in plain Python, and the ``lpips_fast`` logging setup.

The ``Scorer`` and the HTTP service record into a ``Metrics`` object; ``Metrics.snapshot()`` returns
plain dicts (``Scorer.stats()``, ``--metrics-json``) and ``prometheus_collector()`` exposes the same
numbers to prometheus-client (imported only there, i.e. only when serving). One set of numbers, two
views: nothing is counted twice.

Logging goes through ``logging.getLogger("lpips_fast")``, quiet by default (a ``NullHandler``);
``configure_logging(level, fmt)`` attaches one stderr handler, plain text or JSON lines.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "Counter",
    "Gauge",
    "Histogram",
    "Metrics",
    "prometheus_collector",
    "configure_logging",
    "LOGGER_NAME",
    "LATENCY_BUCKETS_S",
    "batch_size_buckets",
]

LOGGER_NAME = "lpips_fast"
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

# Seconds: 0.5 ms .. 30 s, roughly x2 apart (the Prometheus convention of fixed upper bounds).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch`` (and ``max_batch`` itself)."""
    out, b = [], 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(out)


def _key(labelnames: tuple[str, ...], labels: dict[str, Any]) -> tuple[str, ...]:
    if set(labels) != set(labelnames):
        raise ValueError(f"labels: got {sorted(labels)}, expected {sorted(labelnames)}")
    return tuple(str(labels[n]) for n in labelnames)


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        k = _key(self.labelnames, labels)
        with self._lock:
            self._values[k] = self._values.get(k, 0.0) + amount

    def samples(self) -> dict[tuple[str, ...], float]:
        with self._lock:
            return dict(self._values)

    def total(self) -> float:
        return sum(self.samples().values())


class Gauge(_Metric):
    """A value read when asked (``fn``) or set explicitly."""

    kind = "gauge"

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, ())
        self._fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self._fn()) if self._fn is not None else self._value

    def samples(self) -> dict[tuple[str, ...], float]:
        return {(): self.value()}


class Histogram(_Metric):
    """Counts per fixed upper bound (cumulative on export), plus sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets:
            raise ValueError(f"{name}: buckets must not be empty")
        self._data: dict[tuple[str, ...], list] = {}  # key -> [per-bucket counts (+Inf last), sum, count]

    def observe(self, value: float, **labels: Any) -> None:
        k = _key(self.labelnames, labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            d = self._data.get(k)
            if d is None:
                d = self._data[k] = [[0] * (len(self.buckets) + 1), 0.0, 0]
            d[0][i] += 1
            d[1] += value
            d[2] += 1

    def samples(self) -> dict[tuple[str, ...], dict[str, Any]]:
        """Per label set: cumulative ``buckets`` {upper bound: count} (with ``+Inf``), ``sum``, ``count``."""
        out = {}
        with self._lock:
            items = [(k, list(d[0]), d[1], d[2]) for k, d in self._data.items()]
        for k, counts, total, n in items:
            cum, acc = {}, 0
            for b, c in zip(self.buckets + (math.inf,), counts):
                acc += c
                cum[b] = acc
            out[k] = {"buckets": cum, "sum": total, "count": n}
        return out

    def quantile(self, q: float, **labels: Any) -> float | None:
        """Upper bound of the bucket holding the q-quantile (coarse; None without observations)."""
        s = self.samples().get(_key(self.labelnames, labels))
        if not s or s["count"] == 0:
            return None
        target = q * s["count"]
        for b, c in s["buckets"].items():
            if c >= target:
                return b
        return math.inf


class Metrics:
    """A named set of metrics with a common prefix and constant labels (e.g. the A/B arm)."""

    def __init__(self, prefix: str = "lpips_fast", const_labels: dict[str, str] | None = None) -> None:
        self.prefix = prefix
        self.const_labels = dict(const_labels or {})
        self._metrics: dict[str, _Metric] = {}
        self.started = time.time()

    def _add(self, m: _Metric) -> Any:
        if m.name in self._metrics:
            raise ValueError(f"metric {m.name!r} already defined")
        self._metrics[m.name] = m
        return m

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))

    def gauge(self, name: str, help: str, fn: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, fn))

    def histogram(self, name: str, help: str, buckets: Iterable[float], labelnames: Iterable[str] = ()) -> Histogram:
        return self._add(Histogram(name, help, buckets, labelnames))

    def __iter__(self) -> Iterator[_Metric]:
        return iter(list(self._metrics.values()))

    def __getitem__(self, name: str) -> _Metric:
        return self._metrics[name]

    def snapshot(self) -> dict[str, Any]:
        """Plain, JSON-serialisable values: ``{name: value | {label=value,...: value}}``."""
        out: dict[str, Any] = {}
        for m in self:
            s = m.samples()
            if m.kind == "histogram":
                rendered = {
                    _label_text(m.labelnames, k): {
                        "count": v["count"],
                        "sum": v["sum"],
                        "buckets": {("+Inf" if math.isinf(b) else _num(b)): c for b, c in v["buckets"].items()},
                    }
                    for k, v in s.items()
                }
            else:
                rendered = {_label_text(m.labelnames, k): v for k, v in s.items()}
            out[m.name] = rendered.get("", rendered) if not m.labelnames else rendered
        return out


def _num(b: float) -> str:
    return str(int(b)) if float(b).is_integer() else repr(b)


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f"{n}={v}" for n, v in zip(names, values))


def prometheus_collector(sources: Callable[[], Iterable[Metrics]]):
    """A prometheus-client collector reading every ``Metrics`` that ``sources()`` returns.

    Metrics of the same name across sources (e.g. one per A/B arm) become one family, told apart
    by each source's constant labels. Imports prometheus-client (the ``serve`` extra).
    """
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    class _Collector:
        def collect(self):
            families: dict[str, Any] = {}
            for src in sources():
                const = src.const_labels
                for m in src:
                    full = f"{src.prefix}_{m.name}"
                    labels = list(const) + list(m.labelnames)
                    fam = families.get(full)
                    if fam is None:
                        if m.kind == "counter":
                            fam = CounterMetricFamily(full, m.help, labels=labels)
                        elif m.kind == "gauge":
                            fam = GaugeMetricFamily(full, m.help, labels=labels)
                        else:
                            fam = HistogramMetricFamily(full, m.help, labels=labels)
                        families[full] = fam
                    for k, v in m.samples().items():
                        values = list(const.values()) + list(k)
                        if m.kind == "histogram":
                            buckets = [("+Inf" if math.isinf(b) else repr(float(b)), c) for b, c in v["buckets"].items()]
                            fam.add_metric(values, buckets, v["sum"])
                        else:
                            fam.add_metric(values, v)
            yield from families.values()

        def describe(self):
            return []

    return _Collector()


# -- logging ---------------------------------------------------------------------------------
class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any ``extra=`` fields."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in self._skip and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")


def configure_logging(level: str = "warning", fmt: str = "text", stream=None) -> logging.Logger:
    """Send the ``lpips_fast`` logger's records at ``level`` and above to stderr, as text or JSON lines.

    Replaces a handler this function added before (calling it twice does not duplicate lines).
    """
    if level not in LOG_LEVELS:
        raise ValueError(f"log level: got {level!r}, expected one of {LOG_LEVELS}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format: got {fmt!r}, expected one of {LOG_FORMATS}")
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_lpips_fast", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._lpips_fast = True  # type: ignore[attr-defined]
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger
