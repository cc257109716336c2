"""The finetuning methods, by name. Each is an nn.Module over one MaskedLM with
`loss(examples)`, `logits(examples)` (class scores; probabilities are their softmax) and
`after_fit(examples)`; its own tensors (heads, prompts, centroids) are what it adds to the LM."""
from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.methods.cls import ClsMethod
from rapidnlp.finetune.methods.cptuning import CPTuning
from rapidnlp.finetune.methods.distill import MetaTeacher
from rapidnlp.finetune.methods.efl import EFL
from rapidnlp.finetune.methods.pet import PET, PTuning

METHODS = {"cls": ClsMethod, "pet": PET, "fuzzy-pet": PET, "ptuning": PTuning, "cptuning": CPTuning,
           "efl": EFL, "metakd-teacher": MetaTeacher}
# Built from a teacher folder rather than from a masked LM (finetune/cli.py): kd, metakd, selftrain.
TEACHER_METHODS = ("kd", "metakd")

__all__ = ["METHODS", "TEACHER_METHODS", "Method"]
