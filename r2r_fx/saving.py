"""Saving the grown model for ``r2r-rewrite``: as a ``.pt2`` (an ExportedProgram with the batch axis dynamic
where it can be, loading without r2r_fx or the model's own classes) or as a pickled GraphModule."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from r2r_fx.cli_errors import UsageError, first_line
from r2r_fx.compat import set_tracer_class, tracer_class

__all__ = ["export_program", "write_pickle", "write_program"]


def _plain(tree: Any) -> Any:
    """Outputs as plain dicts / tuples / lists, so the saved program loads without the model's own classes."""
    import dataclasses

    if isinstance(tree, torch.Tensor) or tree is None:
        return tree
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_plain(v) for v in tree)
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: _plain(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
    return tree


class _PlainOutputs(nn.Module):
    """A graph module's forward returning plain containers, on the same attributes (so the same state_dict names).

    Not a GraphModule itself: torch.export takes a GraphModule's own output structure, not its forward's.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.__dict__.update({k: v for k, v in gm.__dict__.items() if k not in ("forward", "_wrapped_call")})
        self._graph_forward = type(gm).forward

    def forward(self, *args: Any) -> Any:
        return _plain(self._graph_forward(self, *args))


def export_program(grown: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """An ExportedProgram of ``grown`` with the batch (and a token model's sequence) axis dynamic where it can be.

    torch.export specialises a size-1 axis, so a batch (or sequence) of 1 is exported from an example
    repeated to 2; the program is checked against ``grown`` on the real inputs before it is kept.
    """
    from r2r_fx.export import dynamic_axes_candidates, expand_for_export
    from r2r_fx.tree import max_errors

    grown.eval()
    with torch.no_grad():
        expected = _plain(grown(*inputs))
    last: Exception | None = None
    plain = _PlainOutputs(grown)
    for axes, names in dynamic_axes_candidates(inputs):
        try:
            example = expand_for_export(inputs, axes)
            dynamic = (tuple({a: torch.export.Dim.DYNAMIC for a in ax} if ax else None for ax in axes),)
            program = torch.export.export(plain, example, strict=False, dynamic_shapes=dynamic if names else None)
            with torch.no_grad():
                _, rel = max_errors(expected, program.module()(*inputs))
            if not rel <= 1e-5:
                raise ValueError(f"exported program differs (relative error {rel:.2g})")
            return program, names
        except Exception as exc:  # noqa: BLE001 - try fewer dynamic axes
            last = exc
    raise UsageError(
        f"the grown model cannot be saved as a .pt2: torch.export fails ({first_line(last or Exception())}); "
        "-o NAME.pt saves it as a pickle"
    )


def write_program(program: Any, record: list[Any]) -> Callable[[io.BufferedWriter], None]:
    buffer = io.BytesIO()  # torch's C++ writer aborts the process on a full disk: write from Python instead
    torch.export.save(program, buffer, extra_files={"r2r_record.json": json.dumps(record, default=str)})
    return lambda f: f.write(buffer.getbuffer())


def write_pickle(grown: torch.fx.GraphModule) -> Callable[[io.BufferedWriter], None]:
    buffer = io.BytesIO()
    # Unpickling re-traces with the saved tracer class: torch.export's cannot be built without arguments
    # (``_ModuleStackTracer.__init__() missing 'scope_root'``), so such a file would never load again.
    saved = [(owner, tracer_class(owner)) for owner in (grown, grown.graph) if not _buildable(tracer_class(owner))]
    for owner, _ in saved:
        set_tracer_class(owner, None)
    try:
        torch.save(grown, buffer)
    finally:
        for owner, tracer in saved:
            set_tracer_class(owner, tracer)
    return lambda f: f.write(buffer.getbuffer())


def _buildable(tracer: Any) -> bool:
    if tracer is None:
        return True
    try:
        tracer()
    except Exception:  # noqa: BLE001
        return False
    return True
