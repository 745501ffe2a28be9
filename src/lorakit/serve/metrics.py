"""The server's Prometheus metrics: what /metrics reports, counted here and written in the text exposition format.

Per model: requests, prompt and completion tokens, a latency histogram; request errors by HTTP status; and
the engine's and registry's gauges, read when scraped. Every metric name lives in this module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorakit.serve.adapters import Registry
    from lorakit.serve.engine import Engine

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))  # seconds, upper bounds


@dataclass
class ModelStats:
    """One model's counters since the server started."""

    requests: int = 0
    prompt_tokens: int = 0  # every row's prompt: n samples of one prompt count it n times
    completion_tokens: int = 0
    latency_sum: float = 0.0
    # Cumulative, as Prometheus histograms are: buckets[i] counts requests that took <= LATENCY_BUCKETS[i].
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))


class Stats:
    """The counters /metrics reports. Updated on the event loop only, so no lock."""

    def __init__(self) -> None:
        self.models: dict[str, ModelStats] = defaultdict(ModelStats)
        self.errors: dict[int, int] = defaultdict(int)  # HTTP status -> requests answered with it

    def count(self, model: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """One request answered in full: its tokens (over all its rows) and how long it took."""
        s = self.models[model]
        s.requests += 1
        s.prompt_tokens += prompt_tokens
        s.completion_tokens += completion_tokens
        s.latency_sum += seconds
        for i, le in enumerate(LATENCY_BUCKETS):
            s.buckets[i] += seconds <= le

    def error(self, status: int) -> None:
        self.errors[status] += 1

    def prometheus(self, engine: Engine, registry: Registry) -> str:
        """Prometheus text exposition: the engine's queue, rows and batches and the adapters loaded (read now),
        then `requests()`."""
        lines = [
            "# TYPE lorakit_queue_depth gauge",
            f"lorakit_queue_depth {engine.depth()}",
            "# TYPE lorakit_running_rows gauge",
            f"lorakit_running_rows {engine.running}",
            "# TYPE lorakit_adapters_loaded gauge",
            f"lorakit_adapters_loaded {len(registry.active)}",
            "# TYPE lorakit_batches_total counter",
            f"lorakit_batches_total {engine.batches}",
            "# TYPE lorakit_joined_rows_total counter",
            f"lorakit_joined_rows_total {engine.joined}",
        ]
        return "\n".join(lines) + "\n" + self.requests()

    def requests(self) -> str:
        """Prometheus text of the counters kept here: request errors, per-model requests, tokens and latency."""
        lines = ["# TYPE lorakit_request_errors_total counter"]
        lines += [f'lorakit_request_errors_total{{status="{k}"}} {v}' for k, v in sorted(self.errors.items())]
        models = sorted(self.models.items())
        for key in ("requests", "prompt_tokens", "completion_tokens"):
            lines.append(f"# TYPE lorakit_{key}_total counter")
            lines += [f'lorakit_{key}_total{{model="{_label(m)}"}} {getattr(s, key)}' for m, s in models]
        lines.append("# TYPE lorakit_request_latency_seconds histogram")
        for m, s in models:
            for le, n in zip(LATENCY_BUCKETS, s.buckets):
                bound = "+Inf" if le == float("inf") else f"{le:g}"
                lines.append(f'lorakit_request_latency_seconds_bucket{{model="{_label(m)}",le="{bound}"}} {n}')
            lines.append(f'lorakit_request_latency_seconds_sum{{model="{_label(m)}"}} {_seconds(s.latency_sum)}')
            lines.append(f'lorakit_request_latency_seconds_count{{model="{_label(m)}"}} {s.requests}')
        return "\n".join(lines) + "\n"


def _label(v: str) -> str:
    """A label value as the exposition format quotes it (model names are the clients' own strings)."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _seconds(v: float) -> str:
    """A sum in full (":g" would round it to 6 digits); a whole number without a trailing ".0"."""
    return str(int(v)) if v.is_integer() else repr(v)


# ---- replicated serving (serve/replicas.py): one /metrics for all replicas ----
def summed(texts: Iterable[str], replicas: int) -> str:
    """The expositions of several replicas (`Stats.prometheus`) as one: each sample added up over them (same name,
    same labels), so gauges read as the whole fleet's (its queue depth, the adapter copies loaded), and the
    number of live replicas first."""
    kinds: dict[str, str] = {}
    sums: dict[str, dict[str, float]] = {}  # family -> "name{labels}" -> value, in the order first seen
    for text in texts:
        for family, kind, samples in _families(text):
            kinds.setdefault(family, kind)
            got = sums.setdefault(family, {})
            for key, value in samples:
                got[key] = got.get(key, 0.0) + value
    lines = ["# TYPE lorakit_replicas gauge", f"lorakit_replicas {replicas}"]
    for family, kind in kinds.items():
        lines.append(f"# TYPE {family} {kind}")
        lines += [f"{key} {_seconds(value)}" for key, value in sums[family].items()]
    return "\n".join(lines) + "\n"


def counters(text: str) -> str:
    """`text` without its gauges: what a replica that is gone still adds to the totals (it served those requests;
    it holds no queue any more)."""
    lines = []
    for family, kind, samples in _families(text):
        if kind != "gauge":
            lines.append(f"# TYPE {family} {kind}")
            lines += [f"{key} {_seconds(value)}" for key, value in samples]
    return "\n".join(lines) + "\n"


def _families(text: str) -> list[tuple[str, str, list[tuple[str, float]]]]:
    """(family, its type, its samples as ("name{labels}", value)) of a lorakit exposition, where every sample follows
    the `# TYPE` line of its family (a histogram's _bucket, _sum and _count samples follow the histogram's)."""
    out: list[tuple[str, str, list[tuple[str, float]]]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family, kind = line.split(" ")[2:4]
            out.append((family, kind, []))
        elif line and not line.startswith("#") and out:
            key, _, value = line.rpartition(" ")
            out[-1][2].append((key, float(value)))
    return out
