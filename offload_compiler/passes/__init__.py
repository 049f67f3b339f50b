"""The FX rewrites of Dynamo's graph, each a plain function on a graph module: the prefetch
rewrite (`prefetch.insert_prefetch_ops`) and UVA's copy-before-use fallback
(`uva_fetch.insert_fetches`). README.md beside this file states the invariants they keep."""

from .common import Rewrite, UnsupportedGraphError
from .prefetch import SlotRead, insert_prefetch_ops
from .uva_fetch import FetchRead, insert_fetches

__all__ = [
    "FetchRead",
    "Rewrite",
    "SlotRead",
    "UnsupportedGraphError",
    "insert_fetches",
    "insert_prefetch_ops",
]
