// The device-independent driver of fastkd::fused_linear_kd_forward: distillation through the student's
// linear head (logits = hidden @ weight^T + bias) without ever holding the [rows, vocab] logits.
//
// Rows are processed in chunks. Per chunk:
//   1. the student logits, one GEMM into a [chunk, vocab] buffer (and the teacher's: a slice of the dense
//      teacher logits, or one GEMM of the teacher head; -inf beyond the teacher's vocabulary);
//   2. the response kernel of fastkd::response_forward (or topk_kd_forward) computes each row's loss and
//      writes the gradient of the reduced loss with respect to the logits over the logits, in place (a
//      top-k teacher with the cross-entropy: see topk_ce below), and, for per-row temperatures that require
//      grad, each row's d loss / d temperature;
//   3. the gradients of hidden (one GEMM into its rows), weight (one GEMM accumulated into a float32
//      buffer; float64 for float64 input) and bias (a column sum).
// Extra memory is O(chunk * vocab) plus the float32 weight-gradient accumulator, never O(rows * vocab).
// The per-row losses land in a [rows] buffer reduced once at the end, so the divisor of "batchmean" is the
// global count of counted rows (or num_items) and the result does not depend on the chunk size.
//
// The CPU and CUDA libraries instantiate fused_linear_kd with a backend that supplies
//   B::response(call, count)        the response kernel over the rows of a KdCall (count: host divisor, CPU)
//   B::cosine(params, s, t)         the cosine kernel over the rows of a CosineParams (divergence "cosine")
//   B::topk(call, count)            the top-k kernel over the rows of a TopkCall
//   B::add_weight_grad(acc, g, h)   acc += g^T h, acc float32/64, g and h in the GEMM dtype
//   B::kWidenWeight                 whether a weight not in the accumulation dtype is widened once per call
//   B::linear_wide(out, x, w, b)    out = x @ w^T (+ b) for x, w narrower than out (when not widened)
#pragma once

#include <algorithm>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/addcmul.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>

#include "fastkd/cosine_host.h"
#include "fastkd/kd_host.h"

namespace fastkd {

using Tensor6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (loss, soft, hard, grad_hidden, grad_weight, grad_bias, grad_temperature)
using Tensor7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A head's transform of its logits, z -> softcap(scale * z) with softcap(x) = cap * tanh(x / cap): Cohere's
// logit_scale, then Gemma-2's final logit softcapping. scale 1 and cap 0 leave the logits as they are.
struct HeadTransform {
  double scale = 1.0;
  double softcap = 0.0;  // 0: none
  bool active() const { return scale != 1.0 || softcap != 0.0; }
};

struct FusedLinearOptions {
  LossConfig loss;  // the divergence, its parameters, temperature, weights, masking, reduction
  HeadTransform student_head, teacher_head;
  int64_t chunk_size = 1024;
  bool values_are_logprobs = false;
  bool tail_bucket = false;
  bool grad_hidden = false;
  bool grad_weight = false;
  bool grad_bias = false;
  bool cosine = false;  // divergence "cosine" (cosine_host.h): beta (1 - cos) on the raw logits, params = [eps]
  double cosine_eps = 1e-8;
};

// A head transform's arguments: scale finite and > 0, cap finite and > 0 or 0 (none).
inline HeadTransform head_transform(double scale, double softcap, const char* scale_name, const char* cap_name) {
  FASTKD_CHECK_ARG(std::isfinite(scale) && scale > 0.0, scale_name, "expected a finite value > 0, got ", scale);
  FASTKD_CHECK_ARG(std::isfinite(softcap) && softcap >= 0.0, cap_name,
                   "expected a finite value > 0 (or 0: no softcap), got ", softcap);
  return {scale, softcap};
}

// The operator's scalar arguments, in schema order, checked (make_loss_config) and gathered.
inline FusedLinearOptions fused_linear_options(c10::string_view divergence, c10::ArrayRef<double> params,
                                               double temperature, double soft_weight, double hard_weight,
                                               int64_t ignore_index, c10::string_view reduction,
                                               bool scale_by_temperature, bool values_are_logprobs, bool tail_bucket,
                                               int64_t chunk_size, double student_logit_scale, double student_softcap,
                                               double teacher_logit_scale, double teacher_softcap, bool grad_hidden,
                                               bool grad_weight, bool grad_bias, bool standardize,
                                               double standardize_eps) {
  FusedLinearOptions o;
  o.cosine = to_view(divergence) == "cosine";
  FASTKD_CHECK_ARG(o.cosine || parse_divergence(to_view(divergence)) != Divergence::DKD, "divergence",
                   "the fused linear head does not run 'dkd' (its class targets are the labels of a classifier)");
  if (o.cosine) o.cosine_eps = cosine_head_eps(params);
  FASTKD_CHECK_ARG(!o.cosine || !standardize, "standardize", "'cosine' compares the raw logits: no standardization");
  o.student_head = head_transform(student_logit_scale, student_softcap, "student_logit_scale", "student_softcap");
  o.teacher_head = head_transform(teacher_logit_scale, teacher_softcap, "teacher_logit_scale", "teacher_softcap");
  o.loss = o.cosine ? make_loss_config("kl", {}, temperature, false, soft_weight, hard_weight, ignore_index,
                                        to_view(reduction))
                   : make_loss_config(to_view(divergence), params, temperature, scale_by_temperature, soft_weight,
                                      hard_weight, ignore_index, to_view(reduction), standardize, standardize_eps);
  FASTKD_CHECK_ARG(chunk_size >= 1, "chunk_size", "expected a value >= 1, got ", chunk_size);
  o.chunk_size = chunk_size;
  o.values_are_logprobs = values_are_logprobs;
  o.tail_bucket = tail_bucket;
  o.grad_hidden = grad_hidden;
  o.grad_weight = grad_weight;
  o.grad_bias = grad_bias;
  return o;
}

// hidden [rows, H], weight [V, H], bias [V]: one float dtype, one device.
inline void check_linear_args(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const char* hidden_name, const char* weight_name, const char* bias_name) {
  FASTKD_CHECK_ARG(hidden.dim() == 2, hidden_name, "expected a 2-D [rows, hidden] tensor, got ", hidden.dim(), "-D");
  FASTKD_CHECK_ARG(is_kd_dtype(hidden.scalar_type()), hidden_name,
                   "expected float32, float16, bfloat16 or float64, got ", hidden.scalar_type());
  FASTKD_CHECK_ARG(weight.dim() == 2 && weight.size(1) == hidden.size(1), weight_name, "expected a [vocab, ",
                   hidden.size(1), "] tensor, got ", weight.sizes());
  FASTKD_CHECK_ARG(weight.size(0) > 0, weight_name, "the vocabulary (first) dimension must not be empty");
  FASTKD_CHECK_ARG(weight.scalar_type() == hidden.scalar_type(), weight_name, "expected dtype ", hidden.scalar_type(),
                   " (the hidden states'), got ", weight.scalar_type());
  FASTKD_CHECK_ARG(weight.device() == hidden.device(), weight_name, "expected device ", hidden.device(),
                   " (the hidden states'), got ", weight.device());
  if (bias.has_value()) {
    FASTKD_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), bias_name, "expected shape [",
                     weight.size(0), "], got ", bias->sizes());
    FASTKD_CHECK_ARG(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(), bias_name,
                     "expected ", hidden.scalar_type(), " on ", hidden.device(), ", got ", bias->scalar_type(), " on ",
                     bias->device());
  }
}

// out = x @ w^T (+ b) into out (a [rows, w.size(0)] view with unit column stride, float32 or float64), the
// result never rounded below out's dtype: bfloat16 logits would put an error of up to 2^-9 * |z| into
// every logit before the divergence (4-23% in the gradients of a bf16 fused JSD, Liger-Kernel#1432).
// Operands in out's dtype (b already converted) multiply as they are; a weight in out's dtype (CPU: widened
// once per call) takes the chunk widened too; reduced-precision operands on a backend that keeps them
// (B::kWidenWeight false: cuBLAS) go through its GEMM with a float32 output (B::linear_wide).
template <class B>
void linear_exact(at::Tensor out, const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  const at::ScalarType o = out.scalar_type();
  if (w.scalar_type() == o) {
    const at::Tensor xo = x.scalar_type() == o ? x : x.to(o);
    if (b.has_value()) at::addmm_out(out, *b, xo, w.t());
    else at::mm_out(out, xo, w.t());
  } else {
    B::linear_wide(out, x, w, b);
  }
}

// A head's transform in place, z -> softcap(scale * z). With `keep_tanh` defined (a buffer of z's shape) it
// keeps tanh(scale * z / cap) there for head_transform_grad.
inline void apply_head_transform(at::Tensor z, const HeadTransform& h, at::Tensor keep_tanh) {
  if (h.softcap == 0.0) {
    if (h.scale != 1.0) z.mul_(h.scale);
    return;
  }
  // In-place and tensor-tensor forms only: ATen's out= form with a Scalar multiplies into a temporary and copies.
  z.mul_(h.scale / h.softcap);
  if (keep_tanh.defined()) {
    at::tanh_out(keep_tanh, z);
    at::mul_out(z, keep_tanh, at::scalar_tensor(h.softcap, z.options().device(at::kCPU)));
  } else {
    z.tanh_().mul_(h.softcap);
  }
}

// The chain rule through apply_head_transform: g -> g * scale * (1 - tanh^2) (tanh as it kept; overwritten).
inline void head_transform_grad(at::Tensor g, const HeadTransform& h, at::Tensor kept_tanh) {
  if (h.softcap != 0.0) g.addcmul_(g, kept_tanh.mul_(kept_tanh), -1.0);
  if (h.scale != 1.0) g.mul_(h.scale);
}

// row_temperature [rows]: a temperature per row (row_options.h; replaces the float temperature); each chunk's slice
// goes into the response or top-k kernel, which writes d loss / d row temperature of the chunk's rows
// (grad_temperature) into the extra output.
template <class B>
Tensor7 fused_linear_kd(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_hidden,
                        const std::optional<at::Tensor>& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
                        const std::optional<at::Tensor>& topk_values, const std::optional<at::Tensor>& topk_indices,
                        const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& num_items,
                        const std::optional<at::Tensor>& grad_rows, const std::optional<at::Tensor>& row_weight,
                        const FusedLinearOptions& o, const std::optional<at::Tensor>& row_temperature = std::nullopt,
                        bool grad_temperature = false) {
  check_linear_args(hidden, weight, bias, "student_hidden", "student_weight", "student_bias");
  const int64_t rows = hidden.size(0), vocab = weight.size(0), width = hidden.size(1);
  const at::Device device = hidden.device();
  const int kinds = int(teacher_logits.has_value()) + int(teacher_hidden.has_value()) + int(topk_values.has_value());
  FASTKD_CHECK_ARG(kinds == 1, "teacher",
                   "expected exactly one of: dense teacher logits, a teacher head, a top-k teacher; got ", kinds);
  const Reduction red = o.loss.reduction;
  const bool hard = o.loss.hard;
  FASTKD_CHECK_ARG(!hard || labels.has_value(), "labels", "class targets are required by the cross-entropy part");
  const bool topk = topk_values.has_value();
  FASTKD_CHECK_ARG(!o.grad_bias || bias.has_value(), "student_bias", "a bias gradient was asked for without a bias");
  FASTKD_CHECK_ARG(!grad_temperature || row_temperature.has_value(), "temperature",
                   "its gradient needs the temperature as a tensor");
  FASTKD_CHECK_ARG(!o.cosine || !row_temperature.has_value(), "temperature",
                   "'cosine' has no temperature (it is scale invariant): pass a number");

  // The teacher: its vocabulary (at most the student's: the extra student columns are entries the teacher
  // gives probability 0) and element type.
  int64_t teacher_vocab = vocab;
  at::ScalarType teacher_dtype = hidden.scalar_type();
  if (teacher_logits.has_value()) {
    const at::Tensor& t = *teacher_logits;
    check_logits_arg(t, "teacher_logits");
    FASTKD_CHECK_ARG(t.size(0) == rows, "teacher_logits", "expected ", rows, " rows (the student's), got ", t.size(0));
    FASTKD_CHECK_ARG(t.device() == device, "teacher_logits", "expected device ", device, ", got ", t.device());
    teacher_vocab = t.size(1);
    teacher_dtype = t.scalar_type();
  } else if (teacher_hidden.has_value()) {
    FASTKD_CHECK_ARG(teacher_weight.has_value(), "teacher_weight", "a teacher head needs its weight");
    check_linear_args(*teacher_hidden, *teacher_weight, teacher_bias, "teacher_hidden", "teacher_weight",
                      "teacher_bias");
    FASTKD_CHECK_ARG(teacher_hidden->size(0) == rows, "teacher_hidden", "expected ", rows,
                     " rows (the student's), got ", teacher_hidden->size(0));
    FASTKD_CHECK_ARG(teacher_hidden->device() == device, "teacher_hidden", "expected device ", device, ", got ",
                     teacher_hidden->device());
    teacher_vocab = teacher_weight->size(0);
    teacher_dtype = teacher_hidden->scalar_type();
  } else {
    FASTKD_CHECK_ARG(topk_indices.has_value(), "teacher_topk_indices", "a top-k teacher needs its indices");
    check_topk_args(*topk_values, *topk_indices, rows, vocab, device);
    check_topk_config(o.loss, o.values_are_logprobs, o.tail_bucket);
    teacher_dtype = topk_values->scalar_type();
  }
  FASTKD_CHECK_ARG(teacher_vocab >= 1 && teacher_vocab <= vocab, "teacher",
                   "the teacher's vocabulary must not be larger than the student's (", vocab, "), got ", teacher_vocab);

  FASTKD_CHECK_ARG(!o.loss.standardize || !topk, "standardize", "a top-k teacher has no full row to standardize");
  FASTKD_CHECK_ARG(!o.loss.standardize || teacher_vocab == vocab, "standardize",
                   "standardization needs teacher and student rows of one vocabulary, got ", teacher_vocab, " and ",
                   vocab);
  FASTKD_CHECK_ARG(!o.loss.standardize || vocab >= 2, "standardize",
                   "standardization needs at least 2 classes (an unbiased std), got ", vocab);
  FASTKD_CHECK_ARG(!o.cosine || (!topk && teacher_vocab == vocab), "teacher",
                   "'cosine' needs dense teacher logits or a teacher head with the student's vocabulary (", vocab,
                   "), got ", topk ? "a top-k teacher" : "a smaller vocabulary");
  FASTKD_CHECK_ARG(!topk || !o.teacher_head.active(), "teacher_softcap",
                   "a top-k teacher's values are used as given: no teacher logit scale or softcap");
  const bool any_double = c10::promoteTypes(hidden.scalar_type(), teacher_dtype) == at::kDouble;
  const at::ScalarType acc_dtype = any_double ? at::kDouble : at::kFloat;
  // The loss leaves in the accumulation dtype: a bfloat16 loss would round away what the float32 logits keep.
  const at::ScalarType out_dtype = acc_dtype;
  // Element types the kernels read: the logits of a head always in the accumulation dtype (linear_exact);
  // dense teacher logits in theirs where the kernels have the pair and nothing transforms them.
  const at::ScalarType logit_dtype = acc_dtype;
  const at::ScalarType teacher_buf_dtype = topk || teacher_hidden.has_value() || o.teacher_head.active()
                                               ? acc_dtype
                                               : kd_compute_types(acc_dtype, teacher_dtype).second;
  // The operands of the GEMMs: on a backend without reduced-precision GEMMs of float32 output (the CPU), a
  // reduced-precision weight is widened once per call (O(V * H) memory), so that every GEMM is exact float32.
  auto gemm_weight = [&](const at::Tensor& w) {
    return B::kWidenWeight && w.scalar_type() != acc_dtype ? w.to(acc_dtype) : w;
  };
  auto gemm_bias = [&](const std::optional<at::Tensor>& b, const at::Tensor& w) -> std::optional<at::Tensor> {
    if (!b.has_value() || w.scalar_type() != acc_dtype) return b;  // linear_wide adds it
    return b->to(acc_dtype);
  };
  const at::Tensor weight_g = gemm_weight(weight);
  const std::optional<at::Tensor> bias_g = gemm_bias(bias, weight_g);
  const at::Tensor t_weight_g = teacher_weight.has_value() ? gemm_weight(*teacher_weight) : at::Tensor();
  const std::optional<at::Tensor> t_bias_g = teacher_weight.has_value() ? gemm_bias(teacher_bias, t_weight_g)
                                                                        : std::optional<at::Tensor>();

  at::Tensor labels_l = prepare_labels(labels, hidden, rows);
  if (hard) check_targets_in_range(labels_l, o.loss.ignore_index, vocab);
  at::Tensor count = prepare_count(num_items, labels_l, o.loss.ignore_index, hidden);
  // Always a tensor: the kernels see one chunk at a time, and without it they would divide by its rows.
  if (!count.defined()) count = at::scalar_tensor(static_cast<double>(rows), hidden.options().dtype(at::kDouble));
  const double host_n = device.is_cpu() ? count.item<double>() : 0.0;

  at::Tensor row_weights;  // reduction "none": the upstream gradient of each row's loss
  if (grad_rows.has_value()) {
    FASTKD_CHECK_ARG(red == Reduction::None, "grad_rows", "per-row upstream gradients need reduction 'none'");
    FASTKD_CHECK_ARG(grad_rows->dim() == 1 && grad_rows->size(0) == rows && grad_rows->device() == device,
                     "grad_rows", "expected a [", rows, "] tensor on ", device, ", got ", grad_rows->sizes(), " on ",
                     grad_rows->device());
    row_weights = grad_rows->to(logit_dtype);
  }
  // token_weights: each row's loss times its weight (its gradient too: with the upstream ones above); an
  // uncounted row's weight is 0, so that it is dropped whatever its weight holds (NaN included), as kd_loss does
  at::Tensor token_weights64 =
      row_weight.has_value() ? prepare_row_values(*row_weight, "token_weights", rows, device, false) : at::Tensor();
  if (token_weights64.defined() && labels_l.defined()) {
    token_weights64 = at::where(labels_l.eq(o.loss.ignore_index), at::zeros({}, token_weights64.options()),
                                token_weights64);
  }
  const at::Tensor token_weights = token_weights64.defined() ? token_weights64.to(logit_dtype) : at::Tensor();
  if (token_weights.defined()) row_weights = row_weights.defined() ? row_weights.mul(token_weights) : token_weights;
  // Per-row temperatures, and their gradient: the kernels see each row with weight 1 (the weights above apply
  // after them), so it is weighted at the end, in float64.
  const at::Tensor temps = row_temperature.has_value()
                               ? prepare_row_values(*row_temperature, "temperature", rows, device, true)
                               : at::Tensor();
  at::Tensor grad_temps = at::empty({grad_temperature ? rows : 0}, hidden.options().dtype(at::kDouble));
  auto chunk_temperature = [&](int64_t r0) { return temps.defined() ? temps.data_ptr<double>() + r0 : nullptr; };
  auto chunk_grad_temperature = [&](int64_t r0) {
    return grad_temperature ? grad_temps.data_ptr<double>() + r0 : nullptr;
  };

  at::Tensor values_s, indices_s;
  int64_t k = 0;
  if (topk) {
    std::tie(values_s, indices_s) =
        topk_sorted_teacher(*topk_values, *topk_indices, labels_l, o.loss.ignore_index, vocab, any_double);
    k = values_s.size(1);
  }

  auto opts = hidden.options();
  at::Tensor row_soft = at::zeros({rows}, opts.dtype(acc_dtype));
  at::Tensor row_hard = at::zeros({hard ? rows : 0}, opts.dtype(acc_dtype));
  const bool need_grad = o.grad_hidden || o.grad_weight || o.grad_bias;
  at::Tensor grad_hidden = o.grad_hidden ? at::empty({rows, width}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight_acc = o.grad_weight ? at::zeros({vocab, width}, opts.dtype(acc_dtype)) : at::Tensor();
  at::Tensor grad_bias_acc = o.grad_bias ? at::zeros({vocab}, opts.dtype(acc_dtype)) : at::Tensor();

  const int64_t chunk = std::max<int64_t>(1, std::min(o.chunk_size, rows));
  at::Tensor logits_buf = rows > 0 ? at::empty({chunk, vocab}, opts.dtype(logit_dtype)) : at::Tensor();
  // The teacher's logits go through a buffer when they are computed (teacher head), padded (a smaller
  // teacher vocabulary: the extra columns stay -inf), converted or strided; a dense teacher that the kernels
  // can read as is is only sliced.
  const bool dense_as_is = teacher_logits.has_value() && teacher_vocab == vocab &&
                           teacher_logits->scalar_type() == teacher_buf_dtype && teacher_logits->stride(1) == 1 &&
                           !o.teacher_head.active();
  at::Tensor teacher_buf;
  if (!topk && !dense_as_is && rows > 0) {
    teacher_buf = at::full({chunk, vocab}, -std::numeric_limits<double>::infinity(), opts.dtype(teacher_buf_dtype));
  }

  // A top-k teacher with the cross-entropy: the top-k kernel overwrites the logits with its gradient, so a
  // copy of them goes through the response kernel's cross-entropy part (soft weight 0, the copy as both
  // sides), which adds its gradient in place of the copy.
  const bool topk_ce = topk && hard && rows > 0;
  at::Tensor ce_buf = topk_ce ? at::empty({chunk, vocab}, opts.dtype(logit_dtype)) : at::Tensor();
  at::Tensor ce_soft = topk_ce ? at::empty({chunk}, opts.dtype(acc_dtype)) : at::Tensor();
  // A student softcap with gradients: tanh of the chunk's logits, kept for the chain rule (the kernels
  // overwrite the logits with their gradient).
  at::Tensor tanh_buf = o.student_head.softcap != 0.0 && need_grad && rows > 0
                            ? at::empty({chunk, vocab}, opts.dtype(logit_dtype))
                            : at::Tensor();

  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    const at::Tensor h = hidden.narrow(0, r0, n);
    at::Tensor logits = logits_buf.narrow(0, 0, n);
    linear_exact<B>(logits, h, weight_g, bias_g);
    at::Tensor kept_tanh = tanh_buf.defined() ? tanh_buf.narrow(0, 0, n) : at::Tensor();
    apply_head_transform(logits, o.student_head, kept_tanh);
    const int64_t* chunk_labels = labels_l.defined() ? labels_l.data_ptr<int64_t>() + r0 : nullptr;
    if (topk) {
      TopkCall c;
      c.student = logits;
      TopkParams& p = c.p;
      static_cast<LossConfig&>(p) = o.loss;  // its kernel computes the soft part only, weighted
      p.student = logits.data_ptr();
      p.values = values_s.narrow(0, r0, n).data_ptr();
      p.indices = indices_s.narrow(0, r0, n).data_ptr<int64_t>();
      p.labels = chunk_labels;
      p.count = count.data_ptr<double>();
      p.grad_student = need_grad ? logits.data_ptr() : nullptr;  // in place
      p.row_soft = row_soft.narrow(0, r0, n).data_ptr();
      p.rows = n;
      p.vocab = vocab;
      p.k = k;
      p.student_row_stride = logits.stride(0);
      p.values_are_logprobs = o.values_are_logprobs;
      p.tail_bucket = o.tail_bucket && k < vocab;
      p.row_temperature = chunk_temperature(r0);
      p.row_grad_temperature = chunk_grad_temperature(r0);
      at::Tensor ce = topk_ce ? ce_buf.narrow(0, 0, n).copy_(logits) : at::Tensor();
      B::topk(c, host_n);
      if (topk_ce) {
        KdCall e;
        e.student = e.teacher = ce;
        KdParams& q = e.p;
        static_cast<LossConfig&>(q) = o.loss;
        q.divergence = Divergence::KL;
        q.div = DivArgs{};
        q.soft_weight = 0.0;
        q.student = q.teacher = ce.data_ptr();
        q.labels = chunk_labels;
        q.count = count.data_ptr<double>();
        q.grad_student = need_grad ? ce.data_ptr() : nullptr;  // in place
        q.row_soft = ce_soft.data_ptr();                       // KL(ce || ce) = 0, not used
        q.row_hard = row_hard.narrow(0, r0, n).data_ptr();
        q.rows = n;
        q.vocab = vocab;
        q.student_row_stride = q.teacher_row_stride = ce.stride(0);
        B::response(e, host_n);
        if (need_grad) logits.add_(ce);
      }
    } else {
      at::Tensor t;
      if (dense_as_is) {
        t = teacher_logits->narrow(0, r0, n);
      } else {
        t = teacher_buf.narrow(0, 0, n);
        at::Tensor dst = t.narrow(1, 0, teacher_vocab);
        if (teacher_logits.has_value()) dst.copy_(teacher_logits->narrow(0, r0, n));
        else linear_exact<B>(dst, teacher_hidden->narrow(0, r0, n), t_weight_g, t_bias_g);
        apply_head_transform(dst, o.teacher_head, at::Tensor());
      }
      KdCall c;
      c.student = logits;
      c.teacher = t;
      KdParams& p = c.p;
      static_cast<LossConfig&>(p) = o.loss;
      p.student = logits.data_ptr();
      p.teacher = t.data_ptr();
      p.labels = chunk_labels;
      p.count = count.data_ptr<double>();
      p.grad_student = need_grad ? logits.data_ptr() : nullptr;  // in place
      p.row_soft = row_soft.narrow(0, r0, n).data_ptr();
      p.row_hard = hard ? row_hard.narrow(0, r0, n).data_ptr() : nullptr;
      p.rows = n;
      p.vocab = vocab;
      p.student_row_stride = logits.stride(0);
      p.teacher_row_stride = t.stride(0);
      p.row_temperature = chunk_temperature(r0);
      p.row_grad_temperature = chunk_grad_temperature(r0);
      if (o.cosine) B::cosine(cosine_params_of(p, o.cosine_eps), logits.scalar_type(), t.scalar_type());
      else B::response(c, host_n);
    }
    if (!need_grad) continue;

    // logits now holds d(loss) / d(transformed logits) of these rows: through the head's transform, and
    // weighted by each row's upstream gradient (reduction "none"), it becomes d(loss) / d(h W^T + b).
    head_transform_grad(logits, o.student_head, kept_tanh);
    if (row_weights.defined()) logits.mul_(row_weights.narrow(0, r0, n).unsqueeze(1));
    if (o.grad_bias) grad_bias_acc.add_(logits.sum(0, false, acc_dtype));
    // The GEMMs' operands: in the weight's dtype as the backend multiplies it (float32 for a widened weight).
    const at::ScalarType gemm_dtype = weight_g.scalar_type();
    const at::Tensor g = logits.scalar_type() == gemm_dtype ? logits : logits.to(gemm_dtype);
    if (o.grad_hidden) {
      at::Tensor out = grad_hidden.narrow(0, r0, n);
      if (out.scalar_type() == gemm_dtype) at::mm_out(out, g, weight_g);
      else out.copy_(at::mm(g, weight_g));
    }
    if (o.grad_weight) B::add_weight_grad(grad_weight_acc, g, h.scalar_type() == gemm_dtype ? h : h.to(gemm_dtype));
  }

  if (token_weights.defined()) {
    row_soft.mul_(token_weights);
    if (hard) row_hard.mul_(token_weights);
  }
  auto [loss, soft, hard_part] = finish_parts(row_soft, row_hard, hard, count, red, rows, o.cosine ? 1 : vocab,
                                              o.loss.soft_weight,
                                              o.loss.hard_weight, out_dtype);
  at::Tensor grad_weight = o.grad_weight ? grad_weight_acc.to(weight.scalar_type()) : at::empty({0}, weight.options());
  at::Tensor grad_bias = o.grad_bias ? grad_bias_acc.to(hidden.scalar_type()) : at::empty({0}, opts);
  if (grad_temperature) {
    if (grad_rows.has_value()) grad_temps.mul_(grad_rows->to(at::kDouble));
    if (token_weights64.defined()) grad_temps.mul_(token_weights64);
  }
  const at::Tensor grad_temperature_out =
      row_temperature.has_value() ? grad_temps.to(row_temperature->scalar_type()) : grad_temps;
  return {loss, soft, hard_part, grad_hidden, grad_weight, grad_bias, grad_temperature_out};
}

}  // namespace fastkd
