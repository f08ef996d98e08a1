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
    """The fused head's logit-transform keywords for a Hugging Face model config, as the models apply them
    (and as TRL's DistillationTrainer reads them): ``{side}_logit_scale`` from ``logit_scale`` (Cohere), else
    ``output_multiplier``, else ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling`` (Granite, MiniCPM3
    divide by it; HyperCLOVA X multiplies: ``logits_scaling`` itself), and ``{side}_softcap`` from
    ``final_logit_softcapping`` (Gemma-2, Gemma-3), each only where the config sets it (None and absent mean
    none; a scale of exactly 1 is left out). ``side`` is ``"student"`` or ``"teacher"``; merge the two::

        loss = fastkd.fused_linear_kd_loss(h_s, student.lm_head.weight, fastkd.TeacherHead(h_t, teacher.lm_head.weight),
                                           **head_options(student.config),
                                           **head_options(teacher.config, "teacher"))

    fastkd applies the scale first, then the cap, as the models do. The config may be a ``PretrainedConfig``
    (of a vision-language model too: its text config is read, as ``get_text_config()`` gives it) or a plain
    dict (``config.to_dict()``; a ``text_config`` entry is read the same way).
    """
    if side not in ("student", "teacher"):
        raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
    if isinstance(config, dict):
        text = config.get("text_config")
        if isinstance(text, dict):
            config = text
        get = config.get
    else:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        get = lambda key, default=None: getattr(config, key, default)  # noqa: E731
    scale = get("logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = get(name, None)
    if scale is None and get("logits_scaling", None) is not None:
        scaling = float(get("logits_scaling"))
        scale = scaling if get("model_type", None) == "hyperclovax" else 1.0 / scaling
    out: Dict[str, float] = {}
    cap = get("final_logit_softcapping", None)
    if cap is not None:
        out[f"{side}_softcap"] = float(cap)
    if scale is not None and float(scale) != 1.0:
        out[f"{side}_logit_scale"] = float(scale)
    return out
