"""graphopt's sparse kernels: masked layers (:mod:`graphopt.sparsity`) run on compressed weights.

:mod:`.kernels` (the TIR and the compressed form), :mod:`.lowering` (the fx rewrite before
export and the Relax translations), :mod:`.choice` (sparse or dense, timed on the target).
Imported by :mod:`graphopt.targets.lowering`; TVM is imported lazily.
"""
