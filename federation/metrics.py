"""Prometheus text exposition (format 0.0.4), the one writer every /metrics page uses.

A page is a list of metric families; each family is `# HELP`, `# TYPE` and one sample line per
label set, `name{k="v",...} value` (`name value` without labels). Label values are escaped as
the format requires (backslash, double quote, newline). A family with no samples still has its
HELP and TYPE lines, so a scraper sees every metric a process can expose from its first scrape.
Values are written as Python prints them (`3`, `0.25`, `1735689600.0`).

    page = Exposition()
    page.counter("isthmus_x_total", "Things done.", [({"kind": "a"}, 3)])
    page.gauge("isthmus_y", "Things now.", [({}, 1)])
    body = page.text()

A `Histogram` keeps the counts one histogram family needs (`observe(seconds)`);
`page.histogram_of(name, help, h)` writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

__all__ = ["CONTENT_TYPE", "Exposition", "Histogram", "Sample", "escape", "LATENCY_BUCKETS"]

# seconds; from sub-millisecond handling to a long-poll's minute
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Observations in fixed buckets (upper bounds, ascending), their sum and count."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
                return

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[Mapping[str, object], float]


def escape(value: object) -> str:
    """A label value as the text format needs it: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """The lines of one /metrics page, built family by family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str, samples: Iterable[Sample] = ()) -> None:
        """`# HELP`, `# TYPE` and the samples of one metric; `kind` is counter or gauge."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    def counter(self, name: str, help_: str, samples: Iterable[Sample] = ()) -> None:
        self.family(name, "counter", help_, samples)

    def gauge(self, name: str, help_: str, samples: Iterable[Sample] = ()) -> None:
        self.family(name, "gauge", help_, samples)

    def histogram(self, name: str, help_: str, buckets: Sequence[float], counts: Sequence[int],
                  total: float, count: int) -> None:
        """One histogram without labels: `counts[i]` observations fell in (buckets[i-1],
        buckets[i]] (not cumulative; written cumulative, with +Inf = count)."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        running = 0
        for le, n in zip(buckets, counts, strict=True):
            running += n
            self.lines.append(f'{name}_bucket{{le="{le}"}} {running}')
        self.lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
        self.lines.append(f"{name}_sum {total}")
        self.lines.append(f"{name}_count {count}")

    def histograms(self, name: str, help_: str, buckets: Sequence[float],
                   series: Iterable[tuple[Mapping[str, object], Sequence[int], float, int]]
                   ) -> None:
        """One histogram family with labels: per label set, non-cumulative `counts` (as in
        `histogram`), the sum and the count."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, counts, total, count in series:
            lab = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            sep = "," if lab else ""
            running = 0
            for le, n in zip(buckets, counts, strict=True):
                running += n
                self.lines.append(f'{name}_bucket{{{lab}{sep}le="{le}"}} {running}')
            self.lines.append(f'{name}_bucket{{{lab}{sep}le="+Inf"}} {count}')
            self.lines.append(f"{name}_sum{{{lab}}} {total}" if lab else f"{name}_sum {total}")
            self.lines.append(f"{name}_count{{{lab}}} {count}" if lab else
                              f"{name}_count {count}")

    def histogram_of(self, name: str, help_: str, h: Histogram) -> None:
        self.histogram(name, help_, h.buckets, h.counts, h.total, h.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
