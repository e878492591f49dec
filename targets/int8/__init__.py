"""The integer lowering: graphopt's int8 ops (:mod:`graphopt.ops.int8`) to int8 x int8 -> int32 kernels.

* :mod:`.relax_lowering`: the Relax translation of each ``torch.ops.graphopt.q8_*`` op;
* :mod:`.blocked`: the blocked copies of int8 values carried from conv to conv, and the ATen
  translations (elementwise ops, max pooling, global mean) that keep them; on float values
  they are the frontend's own (plus the omitted-stride max pooling fix), for every graph;
* :mod:`.kernels`: the TE computations (packed weights, the direct packed conv) and the
  pre-scheduled data-movement kernels;
* :mod:`.tensor_intrin`: TVM 0.27's VNNI tensor intrinsic fixed for LLVM 22.

:mod:`graphopt.targets.lowering` imports the translation modules, so every lowering has them.
Nothing here imports TVM at import time.
"""
