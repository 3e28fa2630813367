"""How the model runs, beside what it computes: the execution policy (`Backends`), the fused-op seam (`Ops`), the
one attention seam, FP8 as a model transformation and whole-forward CUDA graphs."""

from engine.runtime.backends import Backends
from engine.runtime.ops import Ops

__all__ = ["Backends", "Ops"]
