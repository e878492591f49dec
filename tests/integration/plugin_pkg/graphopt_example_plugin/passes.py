"""A third-party pass, written only against graphopt's public API."""
import torch.fx as fx
import torch.nn as nn

import graphopt


@graphopt.register_pass("swap_relu_for_functional", exact=True, options={"inplace": False})
def swap_relu_for_functional(gm: fx.GraphModule, ctx: graphopt.PassContext, inplace: bool):
    """Replace nn.ReLU modules with torch.relu calls."""
    import torch

    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.relu, node.args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            ctx.note(f"{node.target} -> torch.relu")
    gm.delete_all_unused_submodules()
    return gm
