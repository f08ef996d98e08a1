"""Argument checks shared by the fused ops and the plain-PyTorch reference: one set of rules, one set of
messages, each naming the offending argument."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float_tensor(x, name: str, min_dim: int) -> None:
    """A float tensor (float32, float16, bfloat16, float64) with at least ``min_dim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def _check_logits_tensor(x: torch.Tensor, name: str) -> None:
    """One logits tensor: a float tensor with at least one dimension (the vocabulary)."""
    _check_float_tensor(x, name, 0)
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a 0-dim tensor")


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    _check_logits_tensor(student_logits, "student_logits")
    _check_logits_tensor(teacher_logits, "teacher_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits must be on the student's device {student_logits.device}, got {teacher_logits.device}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits: the vocabulary (last) dimension must not be empty")


def check_labels(labels: Optional[torch.Tensor], student_logits: torch.Tensor) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    _check_index_tensor(labels, student_logits, "labels")


# The temperature's valid range. The kernels compute in float32 and use 1/T (to scale the logits) and T^2
# (Hinton's factor): both must be finite, nonzero, normal float32 numbers, i.e. 2**-63 <= T <= 2**63. Outside it
# 1/T or T^2 overflows or underflows in float32 and the loss is NaN or 0 whatever the logits (T = 5e-324 gave NaN).
TEMPERATURE_MIN = 2.0**-63
TEMPERATURE_MAX = 2.0**63


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """The softmax temperature: a real number (not a bool, a string or a tensor) with
    ``2**-63 <= T <= 2**63`` (about 1.1e-19 to 9.2e18), so that ``1/T`` and ``T^2`` are finite, nonzero float32
    numbers (the kernels compute in float32). Returns it as a float (as given where symbolic, see
    :func:`_concrete`)."""
    t = _real_number(name, temperature)
    if _concrete(t) and not (TEMPERATURE_MIN <= t <= TEMPERATURE_MAX):  # NaN fails both comparisons
        raise ValueError(
            f"{name} must be finite and > 0, in [2**-63, 2**63] (~1.1e-19 to 9.2e18): the kernels compute in "
            f"float32, where 1/T and the T^2 factor must be finite and nonzero; got {temperature!r}"
        )
    return t


Temperature = Union[float, torch.Tensor]


def check_temperature_or_tensor(temperature, student_logits: torch.Tensor, name: str = "temperature"):
    """A response loss's temperature: a Python number (:func:`check_temperature`), or a floating-point tensor,
    0-dim (one learnable temperature) or of the logits' leading shape ``[...]`` (one per row: instance-wise
    temperatures), on the logits' device (a 0-dim CPU tensor is moved). Returns the float or the tensor. The
    entries' range (the float rule, for every entry) is checked by the op where it reads them (one host sync on
    CUDA) and by :func:`check_row_temperature_values` in the plain-PyTorch path."""
    if not isinstance(temperature, torch.Tensor):
        return check_temperature(temperature, name)
    if not temperature.is_floating_point():
        raise TypeError(f"{name} must be a float or a floating-point tensor, got a {temperature.dtype} tensor")
    lead = tuple(student_logits.shape[:-1])
    if temperature.dim() != 0 and tuple(temperature.shape) != lead:
        raise ValueError(f"{name} as a tensor must be 0-dim or have the logits' leading shape {list(lead)} (one "
                         f"temperature per row), got shape {list(temperature.shape)}")
    if temperature.device != student_logits.device:
        if temperature.dim() == 0 and temperature.device.type == "cpu":
            return temperature.to(student_logits.device)
        raise ValueError(f"{name} must be on the logits' device {student_logits.device}, got {temperature.device}")
    return temperature


def check_row_temperature_values(temperature: torch.Tensor, name: str = "temperature") -> None:
    """Every entry of a temperature tensor in the float rule's range (the op's rule and message)."""
    if temperature.numel() and _inspectable(temperature):
        t = temperature.detach()
        if not bool(((t >= TEMPERATURE_MIN) & (t <= TEMPERATURE_MAX)).all()):
            raise ValueError(f"fastkd: argument '{name}': every entry must be a finite value in [2**-63, 2**63], "
                             f"got min {float(t.min())}, max {float(t.max())}")


def check_token_weights(token_weights: Optional[torch.Tensor], student_logits: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-row weights ``[...]`` (the logits' leading shape), floating point, on the logits' device, or None.
    Returned detached: the weights get no gradient. Any real value is accepted (NaN propagates)."""
    if token_weights is None:
        return None
    if not isinstance(token_weights, torch.Tensor):
        raise TypeError(f"token_weights must be a tensor or None, got {type(token_weights).__name__}")
    if not token_weights.is_floating_point():
        raise TypeError(f"token_weights must be a floating-point tensor, got {token_weights.dtype}")
    lead = tuple(student_logits.shape[:-1])
    if tuple(token_weights.shape) != lead:
        raise ValueError(f"token_weights must have the logits' leading shape {list(lead)} (one weight per row), "
                         f"got shape {list(token_weights.shape)}")
    if token_weights.device != student_logits.device:
        raise ValueError(f"token_weights must be on the logits' device {student_logits.device}, got "
                         f"{token_weights.device}")
    return token_weights.detach()


def check_standardize(standardize, student_logits: torch.Tensor, eps: float = 1e-7) -> float:
    """The ``standardize`` flag (a bool) and its ``eps`` (finite, >= 0); standardization needs ``V >= 2`` (an
    unbiased std). Returns eps as a float."""
    check_bool("standardize", standardize)
    e = check_real("eps", eps, 0.0)
    if standardize:
        check_standardize_classes(student_logits.shape[-1])
    return e


def check_standardize_classes(vocab: int) -> None:
    """Standardization's unbiased std needs ``V >= 2`` classes (the whole vocabulary, also when it is sharded)."""
    if vocab < 2:
        raise ValueError(f"standardize needs at least 2 classes (an unbiased std), got V={vocab}")


def check_reduction(reduction: str) -> str:
    """One of :data:`REDUCTIONS` (a str; TypeError otherwise)."""
    return check_choice("reduction", reduction, REDUCTIONS)


def check_ignore_index(ignore_index: int) -> int:
    """The label value of rows that do not count: a Python int (not a bool); any value (it is compared, not
    used as an index)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_bool(name: str, value) -> bool:
    """A flag of the API (``scale_by_temperature``, ``return_parts``, ``use_relu``, ...): exactly a ``bool``.
    Truthy strings and ints are refused: ``"no"`` would otherwise act as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def check_flags(**flags) -> None:
    """:func:`check_bool` on every keyword argument (name = the API's argument name)."""
    for name, value in flags.items():
        check_bool(name, value)


def check_optional_bool(name: str, value) -> Optional[bool]:
    """None (the documented default) or a bool, as :func:`check_bool`."""
    return None if value is None else check_bool(name, value)


# --------------------------------------------------------------------------------------------------------
# Checks added for the response-based losses (reverse KL, JSD, TVD, DKD, hard-label mix, top-k KD).
# --------------------------------------------------------------------------------------------------------
TOPK_VALUES_ARE = ("logits", "logprobs")
TOPK_TAILS = ("renormalize", "bucket")
_INDEX_DTYPES = (torch.int32, torch.int64)


def _inspectable(x: torch.Tensor) -> bool:
    """True where a tensor's values may be read on the host: not under torch.compile / export tracing and
    not a meta or fake tensor. Value checks (label and index ranges) are skipped where this is False: they
    need the data, which tracing does not have."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return True
    return not is_fake(x)


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _concrete(value) -> bool:
    """Whether a Python number's *value* may be checked here. False for symbolic numbers (``torch.SymInt`` /
    ``torch.SymFloat`` from dynamic shapes or export tracing) and while ``torch.compile`` traces: with
    ``dynamic=True`` Dynamo turns number arguments into symbolic values on which ``math.isfinite`` and
    ``float()`` cannot be traced (and with ``dynamic=False`` a raise would break a ``fullgraph`` graph). Types
    are always checked; value (range) checks are skipped where this is False, as the data-dependent tensor
    checks are (see :func:`_inspectable`): the compiled op still checks its own arguments at run time."""
    return not isinstance(value, _SYMBOLIC) and not torch.compiler.is_compiling()


def _real_number(name: str, value) -> float:
    """A real number (int or float, not a bool, a string or a tensor) as a float; TypeError otherwise.
    A symbolic value (see :func:`_concrete`) is returned as given."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, not a tensor")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number (int or float, not bool or str), got {type(value).__name__}")
    return float(value) if _concrete(value) else value


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
               high_open: bool = False, why: str = "") -> float:
    """A finite real number in the interval from ``low`` to ``high`` (closed unless ``low_open`` /
    ``high_open``): TypeError for a wrong type (see :func:`_real_number`), ValueError naming ``name`` for a
    value out of range (``why`` is appended to the message). Returns it as a float."""
    x = _real_number(name, value)
    if not _concrete(x):
        return x
    ok = math.isfinite(x) and (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        bounds = []
        if low != -math.inf:
            bounds.append(("> " if low_open else ">= ") + f"{low:g}")
        if high != math.inf:
            bounds.append(("< " if high_open else "<= ") + f"{high:g}")
        if low != -math.inf and high != math.inf:
            rng = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        else:
            rng = " and ".join(bounds)
        raise ValueError(f"{name} must be finite{' and ' + rng if rng else ''}{why}, got {value!r}")
    return x


def check_beta_unit(beta: float, name: str = "beta") -> float:
    """The JSD mixing weight: a finite number in [0, 1] (0: forward KL, 1: reverse KL)."""
    return check_real(name, beta, 0.0, 1.0)


def check_nonneg_weight(name: str, value: float) -> float:
    """A loss weight (alpha, beta of the hard-label mix and of DKD): a finite number >= 0."""
    return check_real(name, value, 0.0)


def check_mix_weights(alpha: float, beta: Optional[float], names: tuple = ("alpha", "beta")) -> tuple:
    """The hard-label mix ``alpha * CE + beta * KD`` (kd_loss, and the fused head's ``hard_label_weight`` /
    ``soft_weight``): ``alpha`` finite >= 0; ``beta`` finite >= 0, or None for ``1 - alpha``, in which case
    ``alpha`` must be in [0, 1] (the KD weight would be negative). Returns ``(alpha, beta)`` as floats."""
    a_name, b_name = names
    if beta is not None:
        return check_nonneg_weight(a_name, alpha), check_nonneg_weight(b_name, beta)
    a = check_nonneg_weight(a_name, alpha)
    if _concrete(a) and a > 1.0:
        raise ValueError(
            f"{a_name} must be in [0, 1] when {b_name} is None: {b_name} then defaults to 1 - {a_name}, which "
            f"must not be negative (pass {b_name} explicitly to weight the terms independently), got {alpha!r}"
        )
    return a, 1.0 - a


def check_num_items(num_items_in_batch, reduction: str):
    """``num_items_in_batch``: None, a Python number > 0 or a 0-dim real tensor (its value is not read: that
    would cost a device sync every step). It replaces the counted rows as the divisor of "batchmean" and
    "mean", so it is an error with "sum" or "none". Returns the validated value (None, int, float or the
    tensor as given)."""
    if num_items_in_batch is None:
        return None
    if reduction not in ("batchmean", "mean"):
        raise ValueError(
            "num_items_in_batch replaces the row count of reduction 'batchmean' or 'mean'; it cannot be used "
            f"with reduction={reduction!r}"
        )
    n = num_items_in_batch
    if isinstance(n, torch.Tensor):
        if n.dtype == torch.bool or n.dtype.is_complex:
            raise TypeError(f"num_items_in_batch must be a real (integer or float) tensor, got {n.dtype}")
        if n.dim() != 0:
            raise ValueError(f"num_items_in_batch must be a 0-dim tensor, got shape {tuple(n.shape)}")
        # the value of a CPU tensor is read (free); a device tensor's is not (a sync every step)
        if n.device.type == "cpu" and _inspectable(n):
            value = n.item()
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"num_items_in_batch must be finite and > 0, got tensor({value})")
        return n
    if isinstance(n, bool) or not isinstance(n, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"num_items_in_batch must be None, a number or a 0-dim tensor, got {type(n).__name__}")
    if not _concrete(n):
        return n
    check_real("num_items_in_batch", n, 0.0, low_open=True)
    return int(n) if isinstance(n, numbers.Integral) else float(n)


def _check_index_tensor(x: torch.Tensor, student_logits: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(student_logits.shape[:-1])} (the logits without the vocabulary "
            f"dimension), got {tuple(x.shape)}"
        )
    if x.device != student_logits.device:
        raise ValueError(f"{name} must be on the logits' device {student_logits.device}, got {x.device}")


def check_target(
    labels: Optional[torch.Tensor],
    student_logits: torch.Tensor,
    ignore_index: int,
    required: bool = True,
    name: str = "target",
    check_range: bool = True,
) -> Optional[torch.Tensor]:
    """Class-index targets (the CE target of the hard-label mix, the DKD target): an integer tensor of shape
    ``student_logits.shape[:-1]`` on the logits' device whose counted entries (!= ignore_index) are in
    [0, V). ``required=False`` accepts None; ``check_range=False`` skips the (data-dependent) range check.
    Returns ``labels``."""
    if labels is None:
        if required:
            raise ValueError(
                f"{name} is required: an integer tensor of class indices of shape "
                f"{tuple(student_logits.shape[:-1])}, got None"
            )
        return None
    _check_index_tensor(labels, student_logits, name)
    vocab = student_logits.shape[-1]
    # check_range=False: the fused op checks the range itself (one pass in C++, a ValueError as here).
    if not check_range or labels.numel() == 0 or not _inspectable(labels):
        return labels
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        flat = bad.reshape(-1).nonzero()[0, 0].item()
        value = labels.reshape(-1)[flat].item()
        raise ValueError(
            f"{name} must hold class indices in [0, {vocab}) (or ignore_index={ignore_index} for rows that do "
            f"not count), got {value} (row {flat})"
        )
    return labels


def check_num_classes(student_logits: torch.Tensor, minimum: int, what: str) -> None:
    """At least ``minimum`` classes in the vocabulary (last) dimension (DKD splits off the target: V >= 2)."""
    vocab = student_logits.shape[-1]
    if vocab < minimum:
        raise ValueError(f"{what} needs at least {minimum} classes (V >= {minimum}), got V={vocab}")


def check_student_logits(student_logits: torch.Tensor) -> None:
    """The student logits alone (losses without teacher logits of the same shape, e.g. top-k KD)."""
    _check_logits_tensor(student_logits, "student_logits")
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits: the vocabulary (last) dimension must not be empty")


def check_topk(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    values_are: str,
    tail: str,
) -> None:
    """Top-k teacher input: ``values`` (float) and ``indices`` (int32/int64) of the same shape ``[..., k]``,
    with the student's leading dimensions, ``1 <= k <= V``, on the student's device; ``values`` must not
    require grad (a cached teacher). ``values_are`` in ("logits", "logprobs"), ``tail`` in ("renormalize",
    "bucket"); "bucket" needs log-probabilities. Index values are checked by
    :func:`check_topk_indices_range`."""
    check_student_logits(student_logits)
    check_topk_teacher(tuple(student_logits.shape[:-1]), student_logits.shape[-1], student_logits.device, values,
                       indices, values_are, tail)


def check_topk_teacher(lead: tuple, vocab: int, device: torch.device, values: torch.Tensor, indices: torch.Tensor,
                       values_are: str, tail: str) -> None:
    """The top-k teacher of :func:`check_topk` for student logits of shape ``lead + (vocab,)`` on ``device``
    (which the fused linear head never materializes)."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"teacher_topk_values must be a torch.Tensor, got {type(values).__name__}")
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"teacher_topk_indices must be a torch.Tensor, got {type(indices).__name__}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_topk_values must be float32, float16, bfloat16 or float64, got {values.dtype}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"teacher_topk_indices must be int64 or int32, got {indices.dtype}")
    check_choice("values_are", values_are, TOPK_VALUES_ARE)
    check_choice("tail", tail, TOPK_TAILS)
    if tail == "bucket" and values_are != "logprobs":
        raise ValueError(
            "tail='bucket' needs values_are='logprobs': the teacher's missing mass 1 - sum(exp(values)) is only "
            f"defined for log-probabilities, got values_are={values_are!r}"
        )
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_values and teacher_topk_indices must have the same shape, got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if tuple(values.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_topk_values must have shape {lead + ('k',)} (the student's leading dimensions and k), got "
            f"{tuple(values.shape)}"
        )
    k = values.shape[-1]
    if k < 1 or k > vocab:
        raise ValueError(f"k (the last dimension of teacher_topk_values) must be in [1, V={vocab}], got {k}")
    for name, x in (("teacher_topk_values", values), ("teacher_topk_indices", indices)):
        if x.device != device:
            raise ValueError(f"{name} must be on the student's device {device}, got {x.device}")
    if values.requires_grad:
        raise ValueError(
            "teacher_topk_values must not require grad: top-k KD takes a cached (offline) teacher and gives it "
            "no gradient; pass teacher_topk_values.detach()"
        )


def check_topk_indices_range(
    indices: torch.Tensor, vocab: int, labels: Optional[torch.Tensor], ignore_index: int
) -> None:
    """Every counted row's top-k indices are in [0, V) and distinct (rows whose label is ignore_index are not
    checked: padding may hold anything). Skipped under tracing (see :func:`_inspectable`)."""
    if indices.numel() == 0 or not _inspectable(indices):
        return
    k = indices.shape[-1]
    rows = indices.reshape(-1, k)
    if labels is not None:
        keep = (labels.reshape(-1) != ignore_index).unsqueeze(-1)
    else:
        keep = torch.ones((rows.shape[0], 1), dtype=torch.bool, device=rows.device)
    out_of_range = keep & ((rows < 0) | (rows >= vocab))
    srt = rows.sort(dim=-1).values
    repeated = keep & (srt[:, 1:] == srt[:, :-1])
    if not bool(out_of_range.any() | repeated.any()):
        return
    if bool(out_of_range.any()):
        r, c = out_of_range.nonzero()[0].tolist()
        raise ValueError(
            f"teacher_topk_indices must be in [0, {vocab}) on counted rows, got {rows[r, c].item()} (row {r})"
        )
    r, c = repeated.nonzero()[0].tolist()
    raise ValueError(
        f"teacher_topk_indices must be distinct within a row, but row {r} repeats index {srt[r, c].item()}"
    )


# --------------------------------------------------------------------------------------------------------
# Checks added for the relation- and feature-based losses (RKD, SP, PKT, CC, AT, NST, FitNet hints).
# Features are [N, ...] tensors, one sample per leading index; the losses flatten the rest per sample.
# --------------------------------------------------------------------------------------------------------
CC_KERNELS = ("gaussian", "bilinear")
# SP's row normalization of the Gram matrices: "l2" (RepDistiller Similarity, mdistiller) or "l1" (torchdistill's
# SPKDLoss calls F.normalize(G, 1), whose second positional argument is p)
SP_NORMALIZE = {"l2": 2.0, "l1": 1.0}
AT_MODES = ("code", "paper")
RELATION_REDUCTIONS = ("batchmean", "sum")


def check_feature(x: torch.Tensor, name: str, min_dim: int = 2, what: str = "[N, ...]") -> None:
    """One feature tensor: a float tensor with at least ``min_dim`` dimensions (the batch first) and a
    non-empty per-sample part (it flattens to ``[N, D]`` with ``D >= 1``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions {what} (the batch first), got shape {tuple(x.shape)}"
        )
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name}: the per-sample feature part of shape {tuple(x.shape[1:])} must not be empty")


def check_feature_pair(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    min_dim: int = 2,
    what: str = "[N, ...]",
    names: tuple = ("f_s", "f_t"),
) -> None:
    """Student and teacher features: each as :func:`check_feature`, the same batch size N (their widths may
    differ) and the same device."""
    ns, nt = names
    check_feature(f_s, ns, min_dim, what)
    check_feature(f_t, nt, min_dim, what)
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(
            f"{nt} must have the student's batch size {f_s.shape[0]} ({ns}.shape[0]), got {f_t.shape[0]}"
        )
    if f_t.device != f_s.device:
        raise ValueError(f"{nt} must be on the student's device {f_s.device}, got {f_t.device}")


def check_same_shape(f_s: torch.Tensor, f_t: torch.Tensor, names: tuple = ("f_s", "f_t")) -> None:
    """Losses that compare features elementwise (FitNet's MSE) need identical shapes."""
    if f_t.shape != f_s.shape:
        raise ValueError(
            f"{names[1]} must have the shape of {names[0]} {tuple(f_s.shape)} (use a regressor, e.g. "
            f"fastkd.HintLoss(student_shape, teacher_shape), to map the student onto the teacher), got "
            f"{tuple(f_t.shape)}"
        )


def check_spatial_pair(f_s: torch.Tensor, f_t: torch.Tensor, names: tuple = ("f_s", "f_t")) -> bool:
    """Feature maps ``[N, C, *spatial]`` for attention transfer / NST (channel counts may differ). Returns
    whether the spatial sizes differ, i.e. whether RepDistiller's pooling applies: it compares the heights
    (dim 2) only and pools the larger map to a *square* (h, h) of the smaller height, so that case needs
    4-D maps; after that the flattened spatial sizes must agree."""
    check_feature_pair(f_s, f_t, min_dim=3, what="[N, C, *spatial]", names=names)
    if f_s.shape[2] == f_t.shape[2]:
        if f_s.shape[2:] != f_t.shape[2:]:
            raise ValueError(
                f"{names[0]} and {names[1]} have the same height but different spatial shapes "
                f"{tuple(f_s.shape[2:])} and {tuple(f_t.shape[2:])}; the reference pools on the height only"
            )
        return False
    if f_s.dim() != 4 or f_t.dim() != 4:
        raise ValueError(
            f"{names[0]} and {names[1]} have different spatial sizes {tuple(f_s.shape[2:])} and "
            f"{tuple(f_t.shape[2:])}: pooling them to a common size needs 4-D maps [N, C, H, W]"
        )
    return True


def check_pooled_spatial(f_s: torch.Tensor, f_t: torch.Tensor, names: tuple = ("f_s", "f_t")) -> None:
    """After RepDistiller's pooling (see :func:`check_spatial_pair`) the spatial shapes must agree."""
    if f_s.shape[2:] != f_t.shape[2:]:
        raise ValueError(
            f"{names[0]} and {names[1]}: after pooling to a common height the spatial shapes still differ: "
            f"{tuple(f_s.shape[2:])} and {tuple(f_t.shape[2:])} (the reference pools to a square (h, h))"
        )


def check_layers(g_s, g_t, min_dim: int = 2, what: str = "[N, ...]"):
    """One feature pair (two tensors) or a list of layer pairs (two sequences of tensors of the same,
    non-zero length). Returns ``(list_s, list_t, is_list)``; every pair is checked by
    :func:`check_feature_pair` with names like ``g_s[1]``."""
    s_is_tensor, t_is_tensor = isinstance(g_s, torch.Tensor), isinstance(g_t, torch.Tensor)
    if s_is_tensor and t_is_tensor:
        check_feature_pair(g_s, g_t, min_dim, what, names=("g_s", "g_t"))
        return [g_s], [g_t], False
    for name, g, is_tensor in (("g_s", g_s, s_is_tensor), ("g_t", g_t, t_is_tensor)):
        if not is_tensor and not isinstance(g, (list, tuple)):
            raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(g).__name__}")
    if s_is_tensor != t_is_tensor:
        raise TypeError("g_s and g_t must both be tensors or both be lists/tuples of tensors (one per layer)")
    if len(g_s) != len(g_t):
        raise ValueError(f"g_s and g_t must list the same number of layers, got {len(g_s)} and {len(g_t)}")
    if len(g_s) == 0:
        raise ValueError("g_s and g_t must list at least one layer, got empty lists")
    for i, (a, b) in enumerate(zip(g_s, g_t)):
        check_feature_pair(a, b, min_dim, what, names=(f"g_s[{i}]", f"g_t[{i}]"))
    return list(g_s), list(g_t), True


def check_layer_weights(weights, n_layers: int):
    """Per-layer weights of a list of layer pairs: None (all 1) or a sequence of ``n_layers`` finite numbers
    >= 0. Returns a list of floats."""
    if weights is None:
        return [1.0] * n_layers
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be None or a list/tuple of numbers, got {type(weights).__name__}")
    if len(weights) != n_layers:
        raise ValueError(f"weights must have one entry per layer ({n_layers}), got {len(weights)}")
    return [check_nonneg_weight(f"weights[{i}]", w) for i, w in enumerate(weights)]


def check_positive(name: str, value) -> float:
    """A finite number > 0 (eps, gamma, p)."""
    return check_real(name, value, 0.0, low_open=True)


def check_int_range(name: str, value, minimum: int, maximum: Optional[int] = None, why: str = "") -> int:
    """A Python int (not a bool, not a float) in ``[minimum, maximum]``: TypeError / ValueError naming it."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) or not isinstance(
        value, (numbers.Integral, torch.SymInt)
    ):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not _concrete(value):
        return value
    if value < minimum or (maximum is not None and value > maximum):
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {rng}{why}, got {value}")
    return int(value)


def check_int_at_least(name: str, value, minimum: int) -> int:
    """A Python int (not a bool) >= ``minimum``."""
    return check_int_range(name, value, minimum)


# CC's Taylor order: every order is one more pass over the N x N Gram matrices, and the coefficients
# (2 gamma)^p / p! need p! in float64 (171! overflows): max_p = 10**12 would run for hours.
CC_MAX_P = 170


def check_max_p(max_p) -> int:
    """CC's ``max_p``: an int in ``[1, 170]``."""
    return check_int_range("max_p", max_p, 1, CC_MAX_P, why=" (each order is one more pass over the N x N "
                           "Gram matrices, and the series' coefficients (2 gamma)^p / p! need p! finite in "
                           "float64: 171! overflows)")


def check_chunk_size(chunk_size) -> Optional[int]:
    """The fused head's rows per chunk: None (automatic) or an int >= 1."""
    if chunk_size is None:
        return None
    return check_int_range("chunk_size", chunk_size, 1)


def check_choice(name: str, value, choices: tuple) -> str:
    """One of the strings ``choices``: TypeError for a non-string, ValueError for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_relation_reduction(reduction: str) -> str:
    """SP / CC: "batchmean" divides by N^2 (the anchors' default), "sum" does not (torchdistill's other
    branch)."""
    return check_choice("reduction", reduction, RELATION_REDUCTIONS)


# --------------------------------------------------------------------------------------------------------
# The divergence registry's rules shared by every entry point (fastkd/divergences.py).
# --------------------------------------------------------------------------------------------------------
def resolve_scale_by_temperature(scale_by_temperature: Optional[bool], loss: str) -> bool:
    """``scale_by_temperature`` of a registered divergence (``loss`` already checked): None means the
    divergence's own default (fastkd/divergences.py), True (``T^2``) for the KL-type divergences (as
    :func:`fastkd.kd_loss` and :func:`fastkd.reverse_kl_loss`), False for "jsd" and "tvd" (as
    :func:`fastkd.jsd_loss` and TRL); True where the divergence has no T^2 factor is an error."""
    from fastkd import divergences

    spec = divergences.get(loss)
    scale = check_optional_bool("scale_by_temperature", scale_by_temperature)
    if scale is None:
        return spec.temperature_squared
    if scale and not spec.temperature_squared_allowed:
        if loss == "jsd":
            raise ValueError(
                "scale_by_temperature applies to 'kl' and 'reverse_kl'; the generalized JSD has no T^2 factor "
                "(as fastkd.jsd_loss): pass None or False"
            )
        raise ValueError(
            f"scale_by_temperature=True does not apply to {loss!r}: the {spec.doc} has no T^2 factor (as "
            f"fastkd.{spec.function}): pass None or False"
        )
    return scale


def resolve_divergence_params(loss: str, beta: Optional[float], params, where: str) -> Tuple[float, ...]:
    """The parameters of divergence ``loss`` for the fused head and vocab_parallel_kd_loss, in registry order:
    ``params`` by name, plus ``beta`` for divergences that have one (None: its default; ignored, as documented
    there, by divergences without a beta). Types are checked here, ranges by the op (or ``check_ranges``)."""
    from fastkd import divergences

    spec = divergences.get(loss)
    given = dict(params)
    if beta is not None and "beta" in spec.param_names:
        if "beta" in given:
            raise TypeError(f"{where}: beta given twice")
        given["beta"] = beta
    return spec.resolve(given, where)


# The fused linear head's checks (fastkd/_validation_head.py), reached through this module as the others.
from fastkd._validation_head import (  # noqa: E402,F401
    _Shape,
    check_fused_linear,
    check_head_transforms,
    check_linear_head,
    fused_linear_losses,
)
