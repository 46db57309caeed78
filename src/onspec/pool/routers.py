"""Routers: each maps a query to a route key (a language, a cluster, a named domain) or to None,
"no confident match", which goes to the general draft. One small class per way of routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onspec.data.streams import Query


class Router:
    name = "router"
    opens_at_once = False
    """True when the router itself only emits keys that enough traffic supports (cluster)."""

    def route(self, query: Query, prompt_ids: list[int]) -> str | None:
        raise NotImplementedError

    def stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FieldRouter(Router):
    """The client names the domain: the request's `domain` field (JSONL `domain`, or the HTTP
    request's `domain`). In replay a query without one falls back to its source dataset's name
    when `use_source` is set (e.g. humaneval / sharegpt in a mixed stream)."""

    name = "field"

    def __init__(self, use_source: bool = True) -> None:
        self.use_source = use_source

    def route(self, query: Query, prompt_ids: list[int]) -> str | None:
        if query.domain:
            return query.domain
        return query.source if self.use_source and query.source else None


class LanguageRouter(Router):
    """Language identification with py3langid (langid.py's model, shipped in the wheel): the
    language's ISO 639-1 code when its normalised probability reaches `min_confidence`."""

    name = "language"

    def __init__(self, min_confidence: float = 0.9, min_chars: int = 12) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.min_confidence = min_confidence
        self.min_chars = min_chars

    def identify(self, text: str) -> tuple[str, float]:
        lang, prob = self.identifier.classify(text)
        return lang, float(prob)

    def route(self, query: Query, prompt_ids: list[int]) -> str | None:
        text = query.content.strip()
        if len(text) < self.min_chars:
            return None
        lang, prob = self.identify(text)
        return lang if prob >= self.min_confidence else None


@dataclass
class Cluster:
    id: int
    total: torch.Tensor  # sum of the member representations (raw, uncentred)
    count: int = 0
    opened: bool = False

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.count)


class ClusterRouter(Router):
    """Online clustering of prompt representations. The representation is the mean of the
    target's input embeddings over the prompt's tokens (an index and a mean: microseconds, no
    extra model), centred by the running mean of all prompts seen and L2-normalised.
    A query joins the most similar cluster when the cosine similarity reaches `threshold`, else it
    starts a candidate cluster. A cluster *opens* (gets a route key, hence a draft) only once it has
    `min_size` queries, and at most `max_open` clusters ever open; until then its queries, and any
    query with no confident match, go to the general draft (None)."""

    name = "cluster"
    opens_at_once = True

    def __init__(self, embeddings: torch.Tensor, threshold: float = 0.5, min_size: int = 16, max_open: int = 3,
                 max_candidates: int = 256) -> None:
        if not -1 <= threshold <= 1:
            raise ValueError(f"cluster threshold must be a cosine in [-1, 1], got {threshold}")
        if min_size < 1 or max_open < 0 or max_candidates < 1:
            raise ValueError("cluster min_size and max_candidates must be >= 1, max_open >= 0")
        self.embeddings = embeddings.detach()
        self.threshold = threshold
        self.min_size = min_size
        self.max_open = max_open
        self.max_candidates = max_candidates
        self.clusters: list[Cluster] = []
        self._sum = torch.zeros(embeddings.shape[1], dtype=torch.float64)
        self._n = 0
        self.last_cluster: int | None = None
        """The cluster the last routed query joined (None: it matched none and no candidate had room)."""

    def represent(self, prompt_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor(prompt_ids, dtype=torch.long, device=self.embeddings.device)
        return self.embeddings.index_select(0, ids).double().mean(0).cpu()

    def route(self, query: Query, prompt_ids: list[int]) -> str | None:
        v = self.represent(prompt_ids)
        self._sum += v
        self._n += 1
        cluster, sim = self._nearest(v)
        if cluster is None or (sim < self.threshold and len(self.clusters) < self.max_candidates):
            cluster = Cluster(id=len(self.clusters), total=torch.zeros_like(v))
            self.clusters.append(cluster)
            sim = 1.0
        elif sim < self.threshold:
            self.last_cluster = None
            return None  # no room for another candidate and no confident match: general draft
        self.last_cluster = cluster.id
        cluster.total += v
        cluster.count += 1
        opened = sum(c.opened for c in self.clusters)
        if not cluster.opened and cluster.count >= self.min_size and opened < self.max_open:
            cluster.opened = True
        return f"cluster{cluster.id}" if cluster.opened and sim >= self.threshold else None

    def _nearest(self, v: torch.Tensor) -> tuple[Cluster | None, float]:
        if not self.clusters:
            return None, -1.0
        mu = self._sum / self._n
        x = F.normalize(v - mu, dim=0)
        means = torch.stack([F.normalize(c.mean - mu, dim=0) for c in self.clusters])
        sims = means @ x
        best = int(sims.argmax())
        return self.clusters[best], float(sims[best])

    def state_dict(self) -> dict:
        return {"sum": self._sum, "n": torch.tensor(self._n),
                "totals": torch.stack([c.total for c in self.clusters]) if self.clusters else torch.zeros(0),
                "counts": torch.tensor([c.count for c in self.clusters], dtype=torch.long),
                "opened": torch.tensor([c.opened for c in self.clusters], dtype=torch.bool)}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._n = state["sum"].clone(), int(state["n"])
        self.clusters = [Cluster(id=i, total=t.clone(), count=int(n), opened=bool(o))
                         for i, (t, n, o) in enumerate(zip(state["totals"], state["counts"], state["opened"]))]

    def stats(self) -> dict:
        return {"clusters": len(self.clusters), "opened": [f"cluster{c.id}" for c in self.clusters if c.opened],
                "sizes": {f"cluster{c.id}": c.count for c in self.clusters if c.count >= self.min_size}}


ROUTERS = ("language", "cluster", "field")


def make_router(kind: str, target_model, *, threshold: float, min_size: int, max_open: int,
                language_confidence: float) -> Router:
    if kind == "field":
        return FieldRouter()
    if kind == "language":
        return LanguageRouter(min_confidence=language_confidence)
    if kind == "cluster":
        return ClusterRouter(target_model.get_input_embeddings().weight, threshold=threshold, min_size=min_size,
                             max_open=max_open)
    raise ValueError(f"unknown router {kind!r}; choose from {', '.join(ROUTERS)}")
