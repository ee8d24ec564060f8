"""Torch internals r2r_fx relies on, in one place (each use is covered by the test suite).

* ``aten``: ``torch.ops.aten``, except that an operator this torch build lacks resolves to a
  placeholder that matches no graph node, so rules written for ops of other torch versions do not
  break ``import r2r_fx``.
* ``OpOverload``, ``OpOverloadPacket``, ``HigherOrderOperator``: the classes of operator calls in
  exported graphs (``torch._ops``).
* ``is_concrete_int``: whether a size in an exported graph's metadata is a fixed number.
* ``NormBase`` (batch and instance norms), ``DropoutBase`` (every dropout layer): torch.nn's private
  base classes, which is how a layer is known to follow ``.train()`` / ``.eval()``.
* ``tree_map_only``: map the tensors of a nested structure (``torch.utils._pytree``).
* ``swapped_tensors(module, tensors)``: a context in which ``module``'s parameters and buffers are the
  given tensors (``torch.nn.utils.stateless._reparametrize_module``; ``torch.func.functional_call``
  only runs ``forward``, and shape propagation runs the graph's interpreter).
* ``has_forward_hooks(module)``: whether forward (pre-)hooks are registered on it (private dicts).
* ``drop_export_guards(graph)``: erase the input-guard call (``_guards_fn``) that
  ``ExportedProgram.module()`` adds, which a plain GraphModule cannot keep.
* ``set_tracer_class(owner, cls)``: the tracer a pickled GraphModule or Graph re-traces with when it
  is loaded (``_tracer_cls``; None: re-created from the code).
* ``ExceptionSafeTracer``: ``torch.fx.Tracer`` whose module stack (``Tracer.module_stack``, which
  becomes each node's ``nn_module_stack``) is unwound when a submodule raises during tracing; torch
  leaves the failing submodule on it, and the enclosing module's exit then fails an assertion.
* ``pt2_code_paths()``: the places where ``torch.export.load`` can run code from an archive
  (pickles, ``eval`` of shape text, native libraries, operator look-ups), which loading a ``.pt2``
  without trusting it replaces for the duration. A place this torch lacks raises: loading then
  refuses instead of leaving a path unguarded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.nn.modules.batchnorm import _NormBase as NormBase
from torch.nn.modules.dropout import _DropoutNd as DropoutBase
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map_only

__all__ = [
    "DropoutBase",
    "ExceptionSafeTracer",
    "HigherOrderOperator",
    "NormBase",
    "OpOverload",
    "OpOverloadPacket",
    "aten",
    "drop_export_guards",
    "has_forward_hooks",
    "has_global_forward_hooks",
    "is_concrete_int",
    "pt2_code_paths",
    "set_tracer_class",
    "tracer_class",
    "swapped_tensors",
    "tree_map_only",
]


class _MissingOp:
    """Stands for an ATen operator this torch build does not have: a key no node's target equals."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __getattr__(self, overload: str) -> _MissingOp:  # aten.foo.default of a missing foo
        return _MissingOp(f"{self.__name__}.{overload}")

    def __repr__(self) -> str:
        return f"<missing aten op {self.__name__}>"


class _Aten:
    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            return _MissingOp(name)


aten: Any = _Aten()


@contextlib.contextmanager
def swapped_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the context, ``module``'s parameters and buffers named in ``tensors`` are those tensors."""
    with _reparametrize_module(module, dict(tensors)):
        yield


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward hooks or forward pre-hooks are registered on ``module`` itself."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def has_global_forward_hooks() -> bool:
    """Whether forward hooks or pre-hooks are registered for every module
    (``nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules import module

    return bool(getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None))


_EXPORT_GUARDS = "_guards_fn"  # the submodule ExportedProgram.module() checks its inputs with


def drop_export_guards(graph: torch.fx.Graph) -> None:
    """Erase the calls of the input-guard submodule an unflattened exported program adds."""
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == _EXPORT_GUARDS:
            graph.erase_node(node)


def set_tracer_class(owner: torch.fx.GraphModule | torch.fx.Graph, cls: type | None) -> None:
    """The tracer class ``owner`` records for re-tracing after unpickling (None: none)."""
    owner._tracer_cls = cls


def tracer_class(owner: torch.fx.GraphModule | torch.fx.Graph) -> type | None:
    return getattr(owner, "_tracer_cls", None)


def pt2_code_paths() -> dict[str, tuple[Any, str]]:
    """Where ``torch.export.load`` can run code from the archive: name -> (owner, attribute).

    ``torch_load``: pickled tensors and example inputs; ``sympy``: the module whose ``sympify``
    evaluates shape text; ``pickle``: opaque constants; ``aoti``: AOTInductor shared libraries;
    ``native_pickle``: TorchScript unpickling of custom objects; ``operator``: how a serialized
    graph names the functions it calls. ``sym_ops`` (owner, attribute) holds the symbolic-size
    operators a graph may call besides ATen ones."""
    import torch._export.serde.serialize as serialize
    import torch.export.pt2_archive._package as package

    paths = {
        "torch_load": (torch, "load"),
        "sympy": (serialize, "sympy"),
        "pickle": (package, "pickle"),
        "aoti": (package, "_load_aoti"),
        "native_pickle": (torch._C, "_pickle_load_obj"),
        "operator": (serialize.GraphModuleDeserializer, "deserialize_operator"),
        "sym_ops": (serialize, "_SYM_OPS"),
    }
    missing = [name for name, (owner, attr) in paths.items() if not hasattr(owner, attr)]
    if missing:
        raise RuntimeError(f"this torch has moved what .pt2 loading guards ({', '.join(missing)})")
    return paths


class ExceptionSafeTracer(torch.fx.Tracer):
    """A tracer for models whose ``forward`` catches an exception raised inside a submodule (a
    fallback path): the submodule's entry leaves the module stack as the exception passes."""

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        depth = len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except BaseException:
            while len(self.module_stack) > depth:
                self.module_stack.popitem(last=True)
            raise
