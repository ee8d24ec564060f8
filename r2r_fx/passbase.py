"""Pass infrastructure: a pass is a class with ``call(gm) -> PassResult``; a manager runs several.

Passes never mutate their input: they deep-copy the GraphModule and return the grown copy. What a
pass changed is appended to ``gm.meta["r2r_record"]`` (plain Python data, so it survives deepcopy
and pickling) and also returned in ``PassResult.record``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

__all__ = [
    "Pass",
    "PassError",
    "PassManager",
    "PassResult",
    "append_record",
    "copy_graph_module",
    "make_generator",
    "records_of",
]

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    model: torch.fx.GraphModule
    modified: bool
    record: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: subclasses implement :meth:`transform`; :meth:`call` adds the safety net.

    With ``check`` (the default) the result of an exact transform is run against its input on the
    capture's example inputs (eval mode; train mode too where the model has batch statistics: two or
    four forwards) and :class:`~r2r_fx.errors.NotPreservedError` is raised when they differ.
    """

    name = "pass"
    check = True

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        result = self.transform(gm)
        exact = result.record.get("exact", True)  # True, False or "eval" (exact in eval mode only)
        if self.check and result.modified and exact:
            from r2r_fx.verify import check_preserved

            check_preserved(self.name, gm, result.model, train=exact is True)
        return result

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.call(gm)


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


class PassManager:
    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        done: list[str] = []
        modified = False
        for p in self.passes:
            try:
                result = p.call(gm)
            except Exception as exc:
                raise PassError(f"pass {p.name} failed after {done or 'no passes'}: {exc}") from exc
            gm, modified = result.model, modified or result.modified
            done.append(p.name)
        return PassResult(gm, modified, {"passes": done})


def copy_graph_module(gm: torch.fx.GraphModule, skip: Sequence[torch.Tensor] = ()) -> torch.fx.GraphModule:
    """A deep copy that keeps node names, node meta (shapes) and ``gm.meta``.

    Tensors in ``skip`` are about to be replaced in the copy: they are shared instead of copied.
    """
    memo = {id(t): t for t in skip}
    return copy.deepcopy(gm, memo)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from torch's global RNG when None)."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    return generator


def append_record(gm: torch.fx.GraphModule, entry: dict[str, Any]) -> None:
    """Append to ``gm.meta["r2r_record"]``, mirrored in the plain attribute ``gm.r2r_record``:
    ``torch.save`` / ``torch.load`` of a GraphModule drops ``meta`` but keeps extra attributes."""
    records = list(records_of(gm)) + [entry]
    gm.meta["r2r_record"] = records
    gm.r2r_record = records


def records_of(gm: torch.nn.Module) -> list[dict[str, Any]]:
    """The growth record of a model, also after a pickle round trip (which empties ``meta``)."""
    meta = getattr(gm, "meta", None) or {}
    records = meta.get("r2r_record") or getattr(gm, "r2r_record", None) or []
    if records and isinstance(meta, dict) and "r2r_record" not in meta and hasattr(gm, "meta"):
        gm.meta["r2r_record"] = list(records)
    return list(records)
