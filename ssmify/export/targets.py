"""The export targets, in the order `--to auto` breaks ties in; each states the engines that run it."""

from __future__ import annotations

from ssmify.export.bamba import Bamba
from ssmify.export.base import ExportTarget
from ssmify.export.falcon_h1 import FalconH1
from ssmify.export.granitemoehybrid import GraniteMoeHybrid

# `--to auto` picks the target that the most engines run exactly for the student (`engine_rules.py`); on a
# tie, the first here. GraniteMoeHybrid first: vLLM runs it (it removed Bamba). Bamba next: llama.cpp runs
# it, padded to expand 2. Falcon-H1 last: vLLM runs it too, but it keeps a KV cache and a dead branch in
# every layer.
TARGETS: dict[str, ExportTarget] = {t.name: t for t in (GraniteMoeHybrid(), Bamba(), FalconH1())}
