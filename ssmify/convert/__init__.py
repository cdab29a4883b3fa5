"""Convert a Hugging Face causal LM into a seeded SSM or hybrid student."""

from ssmify.convert.convert import convert, save_student
from ssmify.convert.plan import LayerPlan
from ssmify.convert.student import is_student, mixer_layers, register

register()

__all__ = ["LayerPlan", "convert", "is_student", "mixer_layers", "register", "save_student"]
