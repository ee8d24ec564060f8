"""The torch-internals module: an ATen op this torch lacks must not break the rules."""

from __future__ import annotations

import torch

from r2r_fx.compat import aten


def test_a_missing_aten_op_is_a_placeholder_that_matches_nothing():
    missing = aten.no_such_op_in_this_torch
    assert "missing aten op" in repr(missing) and "missing aten op" in repr(missing.default)
    assert missing != torch.ops.aten.add and missing.default != torch.ops.aten.add.default
    assert aten.add is torch.ops.aten.add  # ops that exist are torch's own
