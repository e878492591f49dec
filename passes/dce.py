"""Dead code elimination: drop nodes whose results nobody uses, and the modules they called."""
from __future__ import annotations

import torch.fx as fx

import graphopt


@graphopt.register_pass(
    "dce",
    exact=True,
    description="Remove nodes whose outputs are unused, and their now-unused submodules",
    runs_after=("fuse_conv_bn", "prune_channels", "separable_conv"),
)
def dce(gm: fx.GraphModule, ctx: graphopt.PassContext) -> fx.GraphModule:
    """fx's eliminate_dead_code keeps impure nodes (in-place ops, side effects): so do we."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    removed = before - len(gm.graph.nodes)
    if removed:
        ctx.note(f"removed {removed} dead node(s)")
    return gm
