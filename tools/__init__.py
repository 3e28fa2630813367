"""Developer and CI tools, not part of the installed engine; run from the repository root as
``python -m tools.<name>``: `cross_compile` (every Triton kernel compiled for the GPU with the wheel's ptxas)."""
