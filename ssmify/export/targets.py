"""The export targets, in the order `--to auto` prefers them."""

from __future__ import annotations

from ssmify.export.bamba import Bamba
from ssmify.export.base import ExportTarget
from ssmify.export.falcon_h1 import FalconH1
from ssmify.export.granitemoehybrid import GraniteMoeHybrid

# Bamba first: it covers the most (MLP bias, partial RoPE) and every engine with a Bamba path keeps its
# RoPE. Falcon-H1 last: it is exact too, but keeps a KV cache and a dead branch in every layer.
TARGETS: dict[str, ExportTarget] = {t.name: t for t in (Bamba(), GraniteMoeHybrid(), FalconH1())}
