"""The precision rule shared by every plain-PyTorch reference (response- and relation-based): the result has the
promoted input dtype and is computed in float64 for float64 input, float32 otherwise. No fastkd imports: both
:mod:`fastkd.reference` and :mod:`fastkd.relation_reference` import it."""

from __future__ import annotations

from typing import Tuple

import torch


def _dtypes(*tensors: torch.Tensor) -> Tuple[torch.dtype, torch.dtype]:
    """(output dtype = promoted input dtype, compute dtype = float64 for float64 else float32)."""
    out = tensors[0].dtype
    for x in tensors[1:]:
        out = torch.promote_types(out, x.dtype)
    return out, (torch.float64 if out == torch.float64 else torch.float32)
