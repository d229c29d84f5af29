"""fxfuse: graph-rewriting passes that fuse LoRA (and friends) in traced Hugging Face models."""
from .frontends.optimize import DEFAULT_PASSES, PASSES, optimize, report
from .frontends.report import Report
from .passes.activation_offload import ActivationOffload

__all__ = ["optimize", "report", "Report", "PASSES", "DEFAULT_PASSES", "ActivationOffload"]
__version__ = "0.1.0"
