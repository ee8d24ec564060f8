"""Pass infrastructure: a pass is a class with ``call(gm) -> PassResult``.

Passes never mutate their input: they deep-copy the GraphModule and return the grown copy. What a
pass changed is a :class:`~r2r_fx.record.GrowthRecord`, appended to the grown model's history
(``r2r_fx.record``) and also returned in ``PassResult.record``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx

from r2r_fx.record import GrowthRecord

__all__ = [
    "Pass",
    "PassResult",
    "copy_graph_module",
    "make_generator",
]


@dataclass
class PassResult:
    model: torch.fx.GraphModule
    modified: bool
    record: GrowthRecord | None = None


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
        exact = result.record.exact if result.record is not None else True  # True, False or "eval"
        if self.check and result.modified and exact:
            from r2r_fx.verify import check_preserved

            check_preserved(self.name, gm, result.model, train=exact is True)
        return result

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.call(gm)


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
