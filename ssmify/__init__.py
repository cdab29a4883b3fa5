"""ssmify: turn a pretrained transformer into a distilled Mamba-2 state-space model or hybrid.

Importing ssmify registers the "ssmify" model type with transformers, so that
`AutoModelForCausalLM.from_pretrained(student_dir)` loads a student.
"""

from ssmify.convert import LayerPlan, convert
from ssmify.errors import SsmifyError
from ssmify.export import export

__all__ = ["LayerPlan", "SsmifyError", "convert", "export"]
