"""Integrations of fastkd with training stacks (optional dependencies: the ``integrations`` extra).

* :mod:`fastkd.integrations.trl`: TRL's distillation trainers with the loss computed by
  :func:`fastkd.fused_linear_kd_loss` (no ``[tokens, V]`` logits of either model).
* :mod:`fastkd.integrations.torchdistill`: fastkd's losses in torchdistill's loss registry.
* :func:`head_options`: the fused head's logit transforms (softcap, logit scale) read from a Hugging Face
  model config.

Importing this package imports none of those libraries; each submodule imports its own.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["head_options"]


def head_options(config: Any, side: str = "student") -> Dict[str, float]:
    """The fused head's logit-transform keywords for a Hugging Face model config: ``{side}_softcap`` from
    ``final_logit_softcapping`` (Gemma-2, Gemma-3) and ``{side}_logit_scale`` from ``logit_scale`` (Cohere),
    each only where the config sets it (None and absent mean none). ``side`` is ``"student"`` or
    ``"teacher"``; merge the two for a call::

        loss = fastkd.fused_linear_kd_loss(h_s, student.lm_head.weight, fastkd.TeacherHead(h_t, teacher.lm_head.weight),
                                           **head_options(student.config),
                                           **head_options(teacher.config, "teacher"))

    A config may also be a plain dict (``config.to_dict()``). A model family whose head transforms its
    logits otherwise (for example divides by a ``logit_scale`` instead of multiplying) is not read here:
    check its modeling code. Cohere multiplies (``logits = logits * self.logit_scale``), Gemma-2 caps
    (``tanh(logits / cap) * cap``); fastkd applies the scale first, then the cap.
    """
    if side not in ("student", "teacher"):
        raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    # Multimodal configs (Gemma-3) keep the language model's settings in text_config.
    text = get("text_config", None)
    if text is not None and get("final_logit_softcapping", None) is None and get("logit_scale", None) is None:
        return head_options(text, side)
    out: Dict[str, float] = {}
    cap = get("final_logit_softcapping", None)
    scale = get("logit_scale", None)
    if cap is not None:
        out[f"{side}_softcap"] = float(cap)
    if scale is not None:
        out[f"{side}_logit_scale"] = float(scale)
    return out
