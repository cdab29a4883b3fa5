"""Export a distilled student as a checkpoint of a native transformers architecture.

The export loads with plain `AutoModelForCausalLM.from_pretrained`, without ssmify and without remote
code, and so in the engines that have that architecture. Targets: GraniteMoeHybrid (what vLLM runs),
Bamba (what llama.cpp runs) and Falcon-H1 (the fallback for mixer widths the others cannot size);
`--verify-engine` runs the export in vLLM or llama.cpp (`ssmify.export.engines`).
"""

from ssmify.export.checks import check_exportable, exportable_targets
from ssmify.export.export import export
from ssmify.export.targets import TARGETS

__all__ = ["TARGETS", "check_exportable", "export", "exportable_targets"]
