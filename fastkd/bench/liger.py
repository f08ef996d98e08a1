"""Liger-Kernel's versions of the benchmark's losses (GPU only, when installed): the logit losses through
torch log-softmaxes where Liger expects log-probabilities or probabilities, and the fused linear
distillation through the lm_head (the teacher as hidden states + lm_head, as Liger-Kernel takes it)."""

from __future__ import annotations

import importlib.util
import inspect
from typing import Callable, Dict, Optional, Union

import torch.nn.functional as F

from fastkd.bench.anchors import IGNORE_INDEX


def error_text(e: BaseException) -> str:
    """An exception as one short line for a "failed" or "skipped" row."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def logit_step(name: str) -> Optional[Callable]:
    """Liger-Kernel's version of a logit loss in the ``(student, teacher_inputs, T)`` convention, or None."""
    try:
        import liger_kernel.transformers as lk
    except Exception:
        return None
    if name == "kd" and hasattr(lk, "LigerKLDIVLoss"):
        loss = lk.LigerKLDIVLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1)) * (T * T)
    if name == "jsd" and hasattr(lk, "LigerJSD"):
        loss = lk.LigerJSD(beta=0.5)
        return lambda s, inp, T: loss(F.log_softmax(s / T, dim=-1), F.log_softmax(inp[0] / T, dim=-1))
    if name == "tvd" and hasattr(lk, "LigerTVDLoss"):
        loss = lk.LigerTVDLoss(reduction="batchmean")
        return lambda s, inp, T: loss(F.softmax(s / T, dim=-1), F.softmax(inp[0] / T, dim=-1))
    return None


def fused_linear_steps(T: float) -> Dict[str, Union[Callable, str]]:
    """Liger-Kernel's fused linear distillation, each mapped to a step function ``(hidden, weight,
    teacher_inputs, T)`` or, where it cannot be set up, to the reason: the Triton ``LigerFusedLinearJSD``
    ("liger") and the chunked torch.compile ``LigerFusedLinearJSDLoss`` ("liger chunked"), both with beta = 0,
    which is forward KL(teacher || student) there. Both take the teacher as hidden states + lm_head, not as
    logits, so they compare with "fastkd head". Their handling of ignored tokens differs between versions: the
    rows compare time and memory only."""
    if importlib.util.find_spec("liger_kernel") is None:
        return {"liger": "liger-kernel not installed"}
    out: Dict[str, Union[Callable, str]] = {}
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE_INDEX, temperature=T)
        out["liger"] = lambda h, w, inp, T: jsd(h, w, inp[2], inp[3], inp[1])
    except Exception as e:
        out["liger"] = error_text(e)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                                          ignore_index=IGNORE_INDEX, temperature=T)
        # the bias arguments are required positionals in some versions and absent in others
        bias = {k: None for k in ("student_bias", "teacher_bias") if k in inspect.signature(chunked.forward).parameters}
        out["liger chunked"] = lambda h, w, inp, T: chunked(h, w, inp[2], inp[3], inp[1], **bias)
    except Exception as e:
        out["liger chunked"] = error_text(e)
    return out
