"""Ops whose behaviour follows the train flag become layers that follow ``.train()`` / ``.eval()``.

A trace or an export records one mode: a functional ``F.dropout(x, training=self.training)`` or an ATen
``batch_norm(..., training, ...)`` is a constant flag in the graph. These passes find such calls (by
comparing the eval-mode and the train-mode graph) and replace them by the torch.nn layer that reads
``self.training`` at run time, holding the model's own tensors. Anything that differs between the two
modes in another way marks the graph eval-only (``gm.meta["r2r_eval_only"]`` holds the reason).
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from r2r_fx.compat import aten as _aten
from r2r_fx.graph import attr_at
from r2r_fx.tree import fresh_inputs

__all__ = ["follow_train_flags", "modulize_train_flags"]


_FUNCTIONAL_DROPOUTS = {
    F.dropout: nn.Dropout,
    F.dropout1d: nn.Dropout1d,
    F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout,
    F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}
_FUNCTIONAL_NORMS = {
    F.batch_norm: ("training", {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}),
    F.instance_norm: ("use_input_stats", {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}),
}


def follow_train_flags(gm: torch.fx.GraphModule, train_gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> None:
    """Turn functional dropout / batch norm / instance norm calls whose train flag differs between the
    eval-mode and the train-mode trace into the nn layers that follow ``.train()``/``.eval()`` (sharing
    the model's tensors); any other difference marks the graph eval-only."""
    nodes, train_nodes = list(gm.graph.nodes), list(train_gm.graph.nodes)
    if len(nodes) != len(train_nodes) or any(not _same_op(gm, a, train_gm, b) for a, b in zip(nodes, train_nodes)):
        gm.meta["r2r_eval_only"] = "the model's graph in train mode has other operations than in eval mode"
        return
    position = {n: i for i, n in enumerate(nodes)} | {n: i for i, n in enumerate(train_nodes)}
    flagged: list[tuple[torch.fx.Node, dict[str, Any]]] = []
    for node, train_node in zip(nodes, train_nodes):
        names = torch.fx.node.map_arg((node.args, node.kwargs), position.__getitem__)
        train_names = torch.fx.node.map_arg((train_node.args, train_node.kwargs), position.__getitem__)
        if names == train_names:
            continue
        layer = _FUNCTIONAL_DROPOUTS.get(node.target) or _FUNCTIONAL_NORMS.get(node.target)
        if layer is None:
            gm.meta["r2r_eval_only"] = f"{node.name} has other arguments in train mode than in eval mode"
            return
        signature = inspect.signature(node.target)
        eval_args = signature.bind(*node.args, **node.kwargs).arguments
        train_args = signature.bind(*train_node.args, **train_node.kwargs).arguments
        flag = "training" if node.target in _FUNCTIONAL_DROPOUTS else _FUNCTIONAL_NORMS[node.target][0]
        differs = {k for k in set(eval_args) | set(train_args) if str(eval_args.get(k)) != str(train_args.get(k))}
        if flag not in differs or differs - {flag, "p"} or (node.target in _FUNCTIONAL_NORMS and "p" in differs):
            gm.meta["r2r_eval_only"] = f"{node.name} has other arguments in train mode than in eval mode"
            return
        flagged.append((node, {**eval_args, "p": train_args.get("p", eval_args.get("p", 0.5))}))
    if not flagged:
        return
    with torch.no_grad():
        ShapeProp(gm).propagate(*fresh_inputs(inputs))  # the ranks pick the layer classes
    modules = [_layer_for(gm, node, args) for node, args in flagged]
    for (node, _), module in zip(flagged, modules):
        if module is None:  # decided before the graph changes
            gm.meta["r2r_eval_only"] = f"{node.name} follows the train mode with statistics that are not buffers"
            return
    for i, ((node, args), module) in enumerate(zip(flagged, modules)):
        # bound again: an earlier replacement may have rewritten this call's inputs (chained dropouts)
        args = {**inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments, "p": args["p"]}
        name = f"r2r_mode_{i}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (args["input"],))
            new = _apply_affine(
                gm.graph, new, args.get("weight"), args.get("bias"), len(node.meta["tensor_meta"].shape)
            )
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()


def _same_op(gm: torch.fx.GraphModule, a: torch.fx.Node, train_gm: torch.fx.GraphModule, b: torch.fx.Node) -> bool:
    """The same operation in both traces; the constants each trace parks (``_tensor_constant0`` in one,
    ``_tensor_constant1`` in the other) count as the same when they hold equal tensors."""
    if a.op != b.op:
        return False
    if a.op != "get_attr" or a.target == b.target:
        return a.target == b.target
    x, y = attr_at(gm, str(a.target)), attr_at(train_gm, str(b.target))
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)


def _apply_affine(graph: torch.fx.Graph, x: torch.fx.Node, weight: Any, bias: Any, rank: int) -> torch.fx.Node:
    """``x * weight + bias`` per channel for a computed (non-parameter) scale or shift, which a norm layer
    cannot hold; parameters and absent ones are left to the layer."""
    if not _affine_outside(weight, bias):
        return x
    shape = [1] * rank
    shape[1] = -1
    for value, op in ((weight, operator.mul), (bias, operator.add)):
        if isinstance(value, torch.fx.Node):
            x = graph.call_function(op, (x, graph.call_method("view", (value, *shape))))
    return x


def _affine_outside(weight: Any, bias: Any) -> bool:
    """Whether a norm's scale and shift are applied after the layer: when either is computed."""
    return any(isinstance(v, torch.fx.Node) and v.op != "get_attr" for v in (weight, bias))


def _layer_for(gm: torch.fx.GraphModule, node: torch.fx.Node, args: dict[str, Any]) -> nn.Module | None:
    """The nn layer computing a functional dropout / norm call, holding the very tensors it read."""
    if node.target in _FUNCTIONAL_DROPOUTS:
        return _FUNCTIONAL_DROPOUTS[node.target](float(args.get("p", 0.5)))
    _, classes = _FUNCTIONAL_NORMS[node.target]
    rank = len(node.meta["tensor_meta"].shape)
    tensors = {k: _attr_tensor(gm, args.get(k)) for k in ("running_mean", "running_var", "weight", "bias")}
    if tensors["running_mean"] is None or tensors["running_var"] is None or rank not in classes:
        return None
    extra = {"track_running_stats": True} if node.target is F.instance_norm else {}
    module = classes[rank](
        tensors["running_mean"].shape[0],
        eps=float(args.get("eps", 1e-5)),
        momentum=args.get("momentum", 0.1),
        affine=False,
        **extra,
    )
    module._buffers["running_mean"], module._buffers["running_var"] = tensors["running_mean"], tensors["running_var"]
    if not _affine_outside(args.get("weight"), args.get("bias")):
        for k in ("weight", "bias"):
            if tensors[k] is not None:
                module._parameters[k] = tensors[k]
    return module


# ATen calls whose behaviour follows a train flag: (position of the flag, position of p for dropouts)
_FLAG_CALLS = {
    _aten.batch_norm.default: (5, None),
    _aten.instance_norm.default: (5, None),
    _aten._native_batch_norm_legit_no_training.default: (None, None),
    _aten.dropout.default: (2, 1),
    _aten.dropout_.default: (2, 1),
    _aten.feature_dropout.default: (2, 1),
    _aten.alpha_dropout.default: (2, 1),
    _aten.feature_alpha_dropout.default: (2, 1),
}
_DROPOUT_LAYERS = {
    _aten.dropout.default: nn.Dropout,
    _aten.dropout_.default: nn.Dropout,
    _aten.feature_dropout.default: nn.Dropout2d,
    _aten.alpha_dropout.default: nn.AlphaDropout,
    _aten.feature_alpha_dropout.default: nn.FeatureAlphaDropout,
}
# torch.nn layers whose train flag is ``self.training`` (their class paths, as export records them)
_MODE_LAYER_PREFIXES = ("torch.nn.modules.batchnorm.", "torch.nn.modules.instancenorm.", "torch.nn.modules.dropout.")


def _in_mode_layer(node: torch.fx.Node) -> bool:
    """Whether an ATen call was made by a torch.nn batch norm, instance norm or dropout layer."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return False
    cls = list(stack.values())[-1][1]
    name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
    return name.startswith(_MODE_LAYER_PREFIXES)


def _user_flag_calls(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in _FLAG_CALLS and not _in_mode_layer(n)]


def modulize_train_flags(gm: torch.fx.GraphModule, train_graph: Any = None) -> None:
    """Replace ATen batch norm, instance norm and dropout calls whose flag follows the mode by nn layers,
    so ``.train()`` / ``.eval()`` act on them.

    Calls made by torch.nn's own layers follow the mode by construction. Calls in the model's own code
    (``F.dropout(x, p, self.training)`` or ``F.batch_norm(..., training=False)``) are compared with
    ``train_graph()`` (the graph exported in train mode): a flag that differs follows the mode, one that
    does not stays as it is. Without a train-mode graph they mark the model eval-only.
    """
    graph = gm.graph
    user_calls = _user_flag_calls(graph)
    in_train: dict[torch.fx.Node, torch.fx.Node] = {}
    if user_calls:
        trained_graph = train_graph() if train_graph is not None else None
        trained = _user_flag_calls(trained_graph) if trained_graph is not None else None
        if trained is None or [n.target for n in trained] != [n.target for n in user_calls]:
            gm.meta["r2r_eval_only"] = (
                f"{user_calls[0].name} sets its train flag in the model's own code, and the graph could not be "
                "compared with a train-mode export"
            )
            user_calls = []
        else:
            for node, train_node in zip(user_calls, trained):
                at = _FLAG_CALLS[node.target][0]
                if at is not None and node.args[at] != train_node.args[at]:
                    in_train[node] = train_node
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _FLAG_CALLS:
            continue
        if not _in_mode_layer(node) and node not in in_train:
            continue
        if node.target in _DROPOUT_LAYERS:
            p = in_train[node].args[1] if node in in_train else node.args[1]
            module = _DROPOUT_LAYERS[node.target](p)
            name = f"r2r_dropout_{count}"
        else:
            module = _norm_module(gm, node)
            if module is None:
                if node.args[3] is not None and node not in in_train:  # a torch.nn layer with computed statistics
                    gm.meta["r2r_eval_only"] = f"{node.name} normalises with statistics that are not buffers"
                elif node in in_train:
                    gm.meta["r2r_eval_only"] = (
                        f"{node.name} follows the train mode with statistics that are not buffers"
                    )
                continue
            name = f"r2r_bn_{count}"
            # where each parameter came from, so optimizers built on the eager model can be carried over
            renames = gm.meta.setdefault("r2r_param_sources", {})
            for attr, arg in zip(("weight", "bias"), node.args[1:3]):
                if getattr(arg, "op", None) == "get_attr":
                    renames[f"{name}.{attr}"] = str(arg.target)
        count += 1
        gm.add_submodule(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            if node.target not in _DROPOUT_LAYERS:
                new = _apply_affine(graph, new, node.args[1], node.args[2], node.meta["val"].dim())
        if node.target == _aten._native_batch_norm_legit_no_training.default:
            for user in list(node.users):  # a tuple (out, mean, invstd): only [0] may be used
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    # num_batches_tracked updates left behind by a train-mode export are done by the modules now.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == _aten.add_.Tensor and not node.users:
            target = node.args[0]
            if getattr(target, "op", None) == "get_attr" and str(target.target).endswith("num_batches_tracked"):
                graph.erase_node(node)
    graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()


def _norm_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """An nn BatchNorm/InstanceNorm layer with the call's parameters and running statistics, or None."""
    x, weight, bias, mean, var = node.args[:5]
    if node.target == _aten._native_batch_norm_legit_no_training.default:
        momentum, eps = node.args[5], node.args[6]
    else:
        momentum, eps = node.args[6], node.args[7]
    tensors = [_attr_tensor(gm, a) for a in (weight, bias, mean, var)]  # a computed weight/bias is applied after
    if tensors[2] is None or tensors[3] is None:
        return None  # statistics that are not buffers: the caller decides
    rank = len(node.meta["val"].shape) if "val" in node.meta else None
    if node.target == _aten.instance_norm.default:
        classes = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
    else:
        classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    cls = classes.get(rank)
    if cls is None:
        return None
    w, b, rm, rv = tensors
    extra = {"track_running_stats": True} if node.target == _aten.instance_norm.default else {}
    module = cls(rm.shape[0], eps=eps, momentum=momentum, affine=False, **extra)
    module.to(device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        for key, t in (("weight", w), ("bias", b)):
            if t is not None and not _affine_outside(weight, bias):
                module._parameters[key] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
        module.running_mean.copy_(rm)
        module.running_var.copy_(rv)
    tracked = _find_num_batches_tracked(gm, mean)
    if tracked is not None:
        module.num_batches_tracked.copy_(tracked)
    return module


def _attr_tensor(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None or getattr(node, "op", None) != "get_attr":
        return None
    return attr_at(gm, node.target)


def _find_num_batches_tracked(gm: torch.fx.GraphModule, mean_node: torch.fx.Node) -> torch.Tensor | None:
    prefix = str(mean_node.target).rpartition(".")[0]
    name = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
    try:
        return attr_at(gm, name)
    except AttributeError:
        return None


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers no get_attr node reads any more (they moved into new modules)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        owner = name.rpartition(".")[0]
        if name in used or any(owner == m or owner.startswith(m + ".") for m in used_modules):
            continue
        module = gm.get_submodule(owner) if owner else gm
        attr = name.rpartition(".")[2]
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
