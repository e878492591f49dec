"""Custom-op contracts: the ``torch.ops.graphopt.*`` operators passes emit and targets lower.

A pass writes these ops into a graph and a target translates them; neither imports the other,
both import the contract from here (``graphopt.passes`` and ``graphopt.targets`` are plugins of
the core, and the core imports neither). Each module defines one family of ops with its
reference kernels and its names:

* :mod:`graphopt.ops.int8`: ``q8_quantize``, ``q8_dequantize``, ``q8_conv``, ``q8_linear``,
  ``q8_matmul`` (emitted by the ``quantize`` pass, lowered by ``graphopt.targets.int8``).

Importing this package registers nothing; importing a family's module registers its ops with
``torch.library`` (a few tens of milliseconds, so ``import graphopt`` does not do it).
"""
