"""/metrics of a cluster: every replica's series with a `replica` label, plus the cluster-wide
sum under `replica="all"` for what adds up (counters, histograms, requests running and waiting).
Gauges that do not add up (alpha, draft version) are per replica only."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

ADDITIVE_GAUGES = {"onspec:num_requests_running", "onspec:num_requests_waiting"}


def merge_expositions(texts: dict[str, str]) -> bytes:
    """replica name -> its exposition text  =>  one exposition with a `replica` label."""
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text):
            out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
            additive = fam.type in ("counter", "histogram") or fam.name in ADDITIVE_GAUGES
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, "replica": replica}, s.value)
                if additive and not s.name.endswith("_created"):
                    totals[fam.name][(s.name, tuple(sorted(s.labels.items())))] += s.value
    for name, sums in totals.items():
        for (sample, labels), value in sums.items():
            families[name].add_sample(sample, {**dict(labels), "replica": "all"}, value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return self.families
