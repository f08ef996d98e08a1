"""Integrations of fastkd with training stacks (optional dependencies: the ``integrations`` extra).

* :mod:`fastkd.integrations.trl`: TRL's distillation trainers with the loss computed by
  :func:`fastkd.fused_linear_kd_loss` (no ``[tokens, V]`` logits of either model).
* :mod:`fastkd.integrations.torchdistill`: fastkd's losses in torchdistill's loss registry.
* :func:`head_options`: the fused head's logit transforms (softcap, logit scale) read from a Hugging Face
  model config.

Importing this package imports none of those libraries; each submodule imports its own.
"""
