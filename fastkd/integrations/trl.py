"""TRL's distillation trainers with the loss computed by :func:`fastkd.fused_linear_kd_loss`.

One line switches a TRL script to fastkd::

    from fastkd.integrations.trl import FastKDDistillationTrainer as DistillationTrainer   # trl.DistillationTrainer
    from fastkd.integrations.trl import FastKDGKDTrainer as GKDTrainer    # trl.experimental.gkd.GKDTrainer

Both are subclasses of TRL's trainers (same arguments, configs, generation, logging); only the distillation loss
changes: the student's and the teacher's last hidden states and lm_head weights go to
``fastkd.fused_linear_kd_loss(..., fastkd.TeacherHead(...), loss="jsd")``, so neither model's ``[tokens, V]``
logits exist, and the value and gradients are TRL's to float rounding:

* the generalized JSD with TRL's ``beta`` (0: ``KL(teacher || student)``, 1: ``KL(student || teacher)``, else
  ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``);
* the temperature as TRL applies it to the loss: both models' logits divided by ``T``, no ``T^2`` factor.
  ``DistillationTrainer`` uses ``args.temperature``; TRL 1.16's ``GKDTrainer.compute_loss`` calls
  ``generalized_jsd_loss`` without a temperature, so its loss is at ``T = 1`` (``GKDConfig.temperature`` is the
  sampling temperature only), and so is fastkd's;
* the same tokens (``GKDTrainer``: the causal shift ``hidden[:, :-1]`` against ``labels[:, 1:]``, tokens whose
  label is -100 (prompt, padding) left out; ``DistillationTrainer``: the completion tokens whose
  ``completion_mask`` (times ``tool_mask``) is non-zero);
* the same normalization: the sum over those tokens divided by ``num_items_in_batch`` when the trainer passes
  one (gradient accumulation; TRL's own count), else by their number (at least 1, so a batch without any gives
  a loss of 0).

Requires TRL (and transformers): ``pip install fastkd[integrations]``. The GKD trainer lives in
``trl.experimental`` and is imported only when :class:`FastKDGKDTrainer` is first used.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

try:
    import trl as _trl  # noqa: F401
    import transformers as _transformers  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised by a test that hides trl
    raise ImportError(
        "fastkd.integrations.trl needs TRL and transformers, which are optional dependencies of fastkd: "
        "pip install fastkd[integrations]"
    ) from _err

from torch import nn

import fastkd
from fastkd.integrations import head_options
from fastkd.reference import head_transform

__all__ = ["FastKDDistillationTrainer", "FastKDGKDTrainer", "generalized_jsd_loss", "jsd_entries"]

_IGNORE_INDEX = -100  # TRL's generalized_jsd_loss masks `labels != -100` (a literal there, not an argument)


# ---------------------------------------------------------------------------------------------------------------
# Logit transforms of the heads (softcap, logit scale)
# ---------------------------------------------------------------------------------------------------------------

def _trl_logit_transforms(config: Any) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of a model as TRL's DistillationTrainer reads them from its (text) config
    (trl/trainer/distillation_trainer.py, ``_compute_loss``; the models' own forwards apply the same transforms to
    the logits TRL's GKDTrainer reads): scale 1.0 and softcap None when the model has none. Read by
    :func:`fastkd.integrations.head_options`, which follows TRL's names and order."""
    options = head_options(config)
    return options.get("student_logit_scale", 1.0), options.get("student_softcap")


def _transform_logits(logits: torch.Tensor, head_keywords: Dict[str, float], role: str) -> torch.Tensor:
    """The model's logits from its lm_head's output: the logit scale, then the softcap (TRL's and the models'
    order; :func:`fastkd.reference.head_transform`)."""
    return head_transform(logits, head_keywords.get(f"{role}_logit_scale", 1.0),
                          head_keywords.get(f"{role}_softcap", 0.0))


def _head_keywords(student_config: Any, teacher_config: Any) -> Dict[str, float]:
    """Keywords of :func:`fastkd.fused_linear_kd_loss` for the two heads' logit transforms, from the models'
    configs (:func:`fastkd.integrations.head_options`)."""
    return {**head_options(student_config, "student"), **head_options(teacher_config, "teacher")}


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------

def _head_tensors(head: nn.Module, role: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight and bias of a model's output embeddings (its lm_head), gathered if they are DTensors (FSDP2),
    as TRL's chunked loss does."""
    if head is None:
        raise TypeError(f"the {role} model has no output embeddings (get_output_embeddings() is None): fastkd needs "
                        "its lm_head weight")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        BaseTunerLayer = ()
    if BaseTunerLayer and isinstance(head, BaseTunerLayer):
        raise ValueError(
            f"a PEFT adapter on the {role}'s lm_head is not supported: the fused loss reads `lm_head.weight` "
            "directly, so the adapter would be ignored. Remove 'lm_head' from your `target_modules`."
        )
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if not isinstance(head, nn.Linear) or weight is None or weight.dim() != 2:
        raise TypeError(f"the {role}'s output embeddings must be a torch.nn.Linear (logits = hidden @ weight.T + "
                        f"bias), got {type(head).__name__}")
    dtensor = getattr(torch.distributed, "tensor", None)
    if dtensor is not None and isinstance(weight, dtensor.DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def _fused_generalized_jsd(
    student_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    mask: torch.Tensor,
    *,
    beta: float,
    temperature: float,
    num_items_in_batch: Any,
    head_keywords: Dict[str, float],
    entropy: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """TRL's generalized JSD of the tokens where ``mask`` is non-zero, through fastkd's fused head.

    Args:
        student_hidden, teacher_hidden: ``[..., H_s]`` / ``[..., H_t]`` last hidden states (before the lm_head),
            one token per leading index, aligned with each other and with ``mask``.
        student_head, teacher_head: the models' output embeddings (``nn.Linear``, vocabulary ``V`` each).
        mask: ``[...]``; tokens where it is non-zero count.
        beta, temperature: TRL's; no ``T^2``.
        num_items_in_batch: the divisor (None: the number of counted tokens, at least 1).
        head_keywords: from :func:`_head_keywords`.
        entropy: also return the sum over the counted tokens of the student's entropy at the temperature (what
            TRL's DistillationTrainer logs), without gradient.

    Returns:
        ``(loss, counted tokens, entropy sum or None)``.
    """
    s_weight, s_bias = _head_tensors(student_head, "student")
    t_weight, t_bias = _head_tensors(teacher_head, "teacher")
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(  # TRL's trainers require one vocabulary (checked on the configs at construction)
            f"the student's lm_head has {s_weight.shape[0]} rows but the teacher's {t_weight.shape[0]}: TRL's "
            "distillation compares full next-token distributions over one shared vocabulary"
        )
    valid = mask.reshape(-1).to(student_hidden.device) != 0
    count = valid.sum()
    # Only the counted tokens are projected (TRL does the same on GPUs): prompt and padding tokens cost nothing.
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[valid]
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(h_s.device)[valid.to(teacher_hidden.device)]
    # fastkd needs hidden states and weight of one dtype (under autocast the hidden states may differ).
    if h_s.dtype != s_weight.dtype:
        h_s = h_s.to(s_weight.dtype)
    if h_t.dtype != t_weight.dtype:
        h_t = h_t.to(t_weight.dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(h_s.device)
    loss = fastkd.fused_linear_kd_loss(
        h_s, s_weight, fastkd.TeacherHead(h_t, t_weight, t_bias), student_bias=s_bias, loss="jsd", beta=beta,
        temperature=temperature, scale_by_temperature=False, reduction="batchmean",
        num_items_in_batch=num_items_in_batch, **head_keywords)
    entropy_sum = None
    if entropy:
        entropy_sum = _entropy_sum(h_s, s_weight, s_bias, temperature, head_keywords)
    return loss, count, entropy_sum


def _entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
                 head_keywords: Dict[str, float]) -> torch.Tensor:
    """Sum over the rows of the entropy of ``softmax(transform(hidden @ weight.T + bias) / T)``, fused: the entropy
    is ``log V - KL(q || uniform)``, and the uniform teacher is a head of zeros of width 1 (one more pass of
    the student's GEMM, no gradient)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    student_keywords = {k: v for k, v in head_keywords.items() if k.startswith("student_")}
    with torch.no_grad():
        uniform = fastkd.TeacherHead(hidden.new_zeros(rows, 1), weight.new_zeros(vocab, 1))
        kl = fastkd.fused_linear_kd_loss(
            hidden.detach(), weight.detach(), uniform, student_bias=None if bias is None else bias.detach(),
            loss="reverse_kl", temperature=temperature, scale_by_temperature=False, reduction="sum",
            **student_keywords)
        return (rows * math.log(vocab) - kl.double()).float()


def _last_hidden_state(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden state (after the final norm, before the lm_head), as TRL's
    DistillationTrainer gets it (``model.base_model``; a PEFT model's base model first)."""
    try:
        from accelerate.utils import is_peft_model
    except ImportError:  # pragma: no cover - accelerate comes with trl
        is_peft_model = None
    if is_peft_model is not None and is_peft_model(model):
        model = model.base_model.model
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__} has no separate backbone (`base_model`): fastkd needs the last "
                        "hidden states without the lm_head")
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _redirect(wrapper: nn.Module, module: nn.Module, fn: Callable, *args: Any) -> Any:
    """Call ``fn(*args)`` inside ``wrapper``'s forward, whose ``module`` is the wrapped model: DDP then prepares
    its gradient reduction and FSDP / DeepSpeed gather the parameters (the lm_head's included) as for a normal
    forward (TRL's DistillationTrainer does the same, with ``_ForwardRedirection``)."""
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")

    def restore() -> None:
        if had_own:
            module.forward = own
        else:
            module.__dict__.pop("forward", None)

    def forward(*_args: Any, **_kwargs: Any) -> Any:
        restore()
        return fn(*_args, **_kwargs)

    module.forward = forward
    try:
        return wrapper(*args)
    finally:
        restore()


# ---------------------------------------------------------------------------------------------------------------
# DistillationTrainer
# ---------------------------------------------------------------------------------------------------------------

from trl import DistillationTrainer as _DistillationTrainer  # noqa: E402


class FastKDDistillationTrainer(_DistillationTrainer):
    """``trl.DistillationTrainer`` with the loss computed by :func:`fastkd.fused_linear_kd_loss` (TRL's own
    chunked loss replaced; everything else, generation included, is TRL's). It also stands for
    ``trl.experimental.distillation.DistillationTrainer``, a deprecated alias of the same class.

    Same arguments as ``trl.DistillationTrainer``, plus:

    Args:
        log_entropy: log the student's mean entropy (``"entropy"``), as TRL does. fastkd computes it with one
            more pass of the student's head GEMM (no gradient); False skips it (``"entropy"`` is then logged as
            None).

    The loss equals TRL's ``_chunked_divergence_loss`` (trl/trainer/distillation_trainer.py): per completion token
    (``completion_mask * tool_mask != 0``) the generalized JSD with ``args.beta`` between ``softmax(z_s / T)`` and
    ``softmax(z_t / T)``, ``T = args.temperature``, no ``T^2``; summed and divided by ``num_items_in_batch`` (in
    training: TRL's count of completion tokens over the generation batch, at least 1, over the number of
    processes) or, without it (evaluation), by the local count of completion tokens (at least 1). Differences:
    the head GEMMs run in the dtype of the lm_head weights (TRL: autocast's dtype under autocast). The heads'
    logit transforms (softcap, logit scale) are read from the configs as TRL reads them
    (:func:`fastkd.integrations.head_options`) and applied inside the fused head.
    """

    def __init__(self, *args: Any, log_entropy: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_entropy = bool(log_entropy)
        self._fastkd_head_keywords = None
        if self.teacher_model is not None:
            self._fastkd_head_keywords = _head_keywords(
                self.accelerator.unwrap_model(self.model).config,
                self.accelerator.unwrap_model(self.teacher_model).config)

    def _compute_loss(self, unwrapped_student: nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TRL's ``_compute_loss`` (run inside the student wrapper's forward by TRL's ``compute_loss``): the same
        inputs and hidden states, the loss through fastkd. Returns ``(loss, entropy sum, counted tokens)``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        completion_mask = inputs["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal_keys = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                           "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
        multimodal_inputs = {k: inputs[k] for k in multimodal_keys if k in inputs}

        student_hidden = self._get_last_hidden_state(
            unwrapped_student, input_ids, attention_mask, logits_to_keep, **multimodal_inputs)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                input_ids, attention_mask, logits_to_keep, **multimodal_inputs)

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student `lm_head` is on {student_head.weight.device} but the teacher `lm_head` is on "
                f"{teacher_head.weight.device}. Place both on the same device in their `device_map`.")
        device = student_head.weight.device
        if self._fastkd_head_keywords is None:
            self._fastkd_head_keywords = _head_keywords(unwrapped_student.config, unwrapped_teacher.config)
        loss, count, entropy_sum = _fused_generalized_jsd(
            student_hidden.to(device), student_head, teacher_hidden.to(device), teacher_head, loss_mask.to(device),
            beta=self.beta, temperature=self.temperature, num_items_in_batch=num_items_in_batch,
            head_keywords=self._fastkd_head_keywords, entropy=self.log_entropy)
        if entropy_sum is None:
            entropy_sum = torch.full((), math.nan, device=device)  # logged as None by TRL's `log`
        return loss, entropy_sum.detach(), count


# ---------------------------------------------------------------------------------------------------------------
# GKDTrainer (trl.experimental: built on first use)
# ---------------------------------------------------------------------------------------------------------------

def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean", num_items_in_batch: Any = None) -> torch.Tensor:
    """Drop-in for TRL's ``GKDTrainer.generalized_jsd_loss`` (trl.experimental.gkd, TRL 1.16): the same signature
    and, for every reduction, the same returns; the reduced ones from the fused kernels (:func:`fastkd.jsd_loss`).

    * the per-entry value, at ``p = softmax(t / T)``, ``q = softmax(s / T)``: ``beta = 0``: ``p (log p - log q)``;
      ``beta = 1``: ``q (log q - log p)``; else ``beta p (log p - log m) + (1 - beta) q (log q - log m)``,
      ``m = beta p + (1 - beta) q``; no ``T^2``;
    * ``labels``: entries of rows with ``labels == -100`` are dropped (TRL's literal, not an argument);
    * ``num_items_in_batch`` given: the sum of the kept entries divided by it, **whatever** ``reduction`` is
      (``"none"`` included), as TRL does for gradient accumulation;
    * else ``"batchmean"``: the sum divided by the number of kept rows (at least 1), or without labels by
      ``student_logits.size(0)`` (``B`` for ``[B, T, V]`` input: TRL's quirk); ``"sum"``; ``"mean"``: the sum
      over ``kept rows * V`` entries;
    * ``"none"``: the per-entry tensor: ``[B, T, V]`` without labels, ``[kept rows, V]`` with them (TRL returns
      ``jsd[mask]``). It is computed entry by entry in plain PyTorch (it *is* a ``[.., V]`` tensor; no fused
      kernel returns one), differentiable.

    Differences (TRL's value is not a number there, but for the last): entries that are -inf in both logits (masked tokens),
    or whose probability underflows to 0, contribute exactly 0 (TRL: NaN from ``0 * (-inf)``); ``"mean"`` of a
    batch without kept rows is 0 (TRL: the NaN mean of an empty tensor); a ``num_items_in_batch`` that is not
    > 0 is an error (TRL: inf or NaN); a reduction other than ``"batchmean"``, ``"sum"``, ``"mean"``, ``"none"``
    is an error (TRL returns the per-entry tensor for any other string). Results are computed in float32
    (float64 for float64 input) and returned in the inputs' promoted dtype.

    Liger-Kernel's ``LigerKLDIVLoss`` and ``LigerTVDLoss`` with ``reduction="none"`` are per entry too, while
    fastkd's fused losses (``kd_loss``, ``tvd_loss``, ``jsd_loss``) return one value per row for ``"none"``. The
    drop-in for Liger's per-entry KL is :func:`jsd_entries` with ``beta=0`` on logits (Liger takes the
    log-softmaxes); Liger's per-entry TVD is ``0.5 * (softmax(t) - softmax(s)).abs()``; its ``LigerJSD`` has no
    ``"none"``.
    """
    if reduction not in ("batchmean", "sum", "mean", "none"):
        raise ValueError(f"reduction must be one of 'batchmean', 'sum', 'mean', 'none', got {reduction!r}")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(student_logits.device)
        return fastkd.jsd_loss(student_logits, teacher_logits, beta, temperature, reduction="batchmean",
                               labels=labels, num_items_in_batch=num_items_in_batch)
    if reduction == "none":
        return jsd_entries(student_logits, teacher_logits, labels, beta, temperature)
    if reduction == "batchmean" and labels is None and student_logits.dim() < 2:
        # TRL: jsd.sum() / jsd.size(0); a single row's size(0) is its vocabulary
        total = fastkd.jsd_loss(student_logits, teacher_logits, beta, temperature, reduction="sum")
        return total / max(student_logits.shape[0], 1)
    return fastkd.jsd_loss(student_logits, teacher_logits, beta, temperature, reduction=reduction, labels=labels)


_generalized_jsd_loss = generalized_jsd_loss  # the name FastKDGKDTrainer binds (kept for earlier imports)


def _jsd_terms(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's per-entry generalized JSD from the log-probabilities, -inf-safe (fastkd.reference's helpers)."""
    from fastkd import reference as ref

    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        return ref._plogp_ratio(p, log_p, log_q)
    if beta == 1.0:
        return ref._plogp_ratio(q, log_q, log_p)
    log_m = ref._safe_logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * ref._plogp_ratio(p, log_p, log_m) + (1.0 - beta) * ref._plogp_ratio(q, log_q, log_m)


def jsd_entries(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
                beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The per-entry generalized JSD that TRL's ``generalized_jsd_loss(..., reduction="none")`` returns:
    ``[..., V]``, or ``[kept rows, V]`` with ``labels`` (rows with label -100 dropped), in plain PyTorch
    (differentiable). -inf-safe: entries of zero probability contribute exactly 0 (never ``0 * inf``), rows that
    are -inf everywhere on both sides are all 0. ``beta = 0`` gives the per-entry ``KL(p || q)`` terms (Liger's
    ``LigerKLDIVLoss(reduction="none")`` on the log-softmaxes)."""
    from fastkd import _validation as v
    from fastkd import reference as ref
    from fastkd._precision import _dtypes

    v.check_logits(student_logits, teacher_logits)
    v.check_labels(labels, student_logits)
    t = v.check_temperature(temperature)
    b = v.check_beta_unit(beta)
    out_dtype, cdtype = _dtypes(student_logits, teacher_logits)
    s, te, empty = ref._fully_masked(student_logits, teacher_logits)
    log_q, log_p = ref._log_softmaxes(s, te, t, cdtype)
    terms = torch.where(empty.unsqueeze(-1), ref._zero(log_q), _jsd_terms(log_q, log_p, b))
    if labels is not None:
        terms = terms[labels != _IGNORE_INDEX]
    return terms.to(out_dtype)


def _build_gkd_trainer() -> type:
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.utils import empty_cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class FastKDGKDTrainer(GKDTrainer):
        """``trl.experimental.gkd.GKDTrainer`` with the loss computed by :func:`fastkd.fused_linear_kd_loss`
        (everything else, on-policy generation and ``seq_kd`` included, is TRL's).

        Same arguments as TRL's. ``compute_loss`` equals TRL's: the student's and the teacher's last hidden states
        on ``input_ids`` / ``attention_mask`` (the teacher in eval mode, without gradient), shifted
        (``hidden[:, :-1]`` predicts ``labels[:, 1:]``), tokens with label -100 left out, the generalized JSD
        with ``args.beta`` at temperature 1 (TRL 1.16 passes no temperature to ``generalized_jsd_loss``; its
        ``args.temperature`` is the sampling temperature) and ``reduction="batchmean"``: the sum divided by
        ``num_items_in_batch`` when given, else by the unmasked tokens (at least 1). ``generalized_jsd_loss`` is
        :func:`generalized_jsd_loss` (TRL's semantics for every reduction).

        Differences: the hidden states come from the backbone (``model.base_model``) inside the wrapped model's
        forward, under the accelerator's autocast; the head GEMMs run in the dtype of the lm_head weights. With
        ``return_outputs=True`` (evaluation) the returned outputs hold only the student's ``logits``, computed
        from its hidden states. A ``num_items_in_batch`` of 0 (no completion token in the whole batch) is an
        error (TRL: a NaN loss). The heads' logit transforms (softcap, logit scale) are read from the configs
        (:func:`fastkd.integrations.head_options`) and applied inside the fused head.
        """

        generalized_jsd_loss = staticmethod(_generalized_jsd_loss)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fastkd_head_keywords = _head_keywords(
                self.accelerator.unwrap_model(self.model).config,
                self.accelerator.unwrap_model(self.teacher_model).config)

        def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None):
            """TRL's ``compute_loss`` through fastkd: the loss, or ``(loss, outputs)`` with ``outputs.logits``
            the student's logits (built only then)."""
            unwrapped = self.accelerator.unwrap_model(model)
            # the accelerator's autocast: the forward TRL calls carries it, the redirected one does not
            with self.accelerator.autocast():
                loss, logits = _redirect(model, unwrapped, self._fastkd_loss, unwrapped, inputs,
                                         num_items_in_batch, return_outputs)
            empty_cache()
            return (loss, CausalLMOutputWithPast(loss=loss, logits=logits)) if return_outputs else loss

        def _fastkd_loss(self, unwrapped: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Any,
                         with_logits: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
            student_hidden = _last_hidden_state(unwrapped, input_ids, attention_mask)
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                teacher_hidden = _redirect(self.teacher_model, unwrapped_teacher, _last_hidden_state,
                                           unwrapped_teacher, input_ids, attention_mask)
            student_head = unwrapped.get_output_embeddings()
            teacher_head = unwrapped_teacher.get_output_embeddings()
            device = student_head.weight.device
            loss, _, _ = _fused_generalized_jsd(
                student_hidden[:, :-1].to(device), student_head, teacher_hidden[:, :-1].to(device), teacher_head,
                inputs["labels"][:, 1:].to(device) != _IGNORE_INDEX, beta=self.beta, temperature=1.0,
                num_items_in_batch=num_items_in_batch, head_keywords=self._fastkd_head_keywords)
            logits = None
            if with_logits:  # what TRL returns (the model's logits), built only when asked for
                logits = _transform_logits(student_head(student_hidden), self._fastkd_head_keywords, "student")
            return loss, logits

    FastKDGKDTrainer.__module__ = __name__
    FastKDGKDTrainer.__qualname__ = "FastKDGKDTrainer"  # found by pickle through this module's __getattr__
    return FastKDGKDTrainer


_LAZY = {"FastKDGKDTrainer": _build_gkd_trainer}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
