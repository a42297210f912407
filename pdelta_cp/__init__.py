"""pdelta-cp: context-parallel training for preconditioned delta-rule recurrences (PDN, PGDN, PKDA)."""
from .ops import precond_delta_rule

__all__ = ["precond_delta_rule"]
__version__ = "0.1.0"
