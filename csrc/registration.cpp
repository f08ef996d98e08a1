// Every fastkd operator schema, declared once (the relation family's come from its list, fastkd/relation_ops.h).
// The Python module _C exists for introspection (build_info); the operators are reached through
// torch.ops.fastkd.*, which composes with autograd, torch.compile and torch.library.opcheck.
#include <string>

#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "fastkd/divergences.h"
#include "fastkd/relation_ops.h"

#ifndef FASTKD_CUDA_ARCHS
#define FASTKD_CUDA_ARCHS ""
#endif
#ifndef FASTKD_TORCH_VERSION
#define FASTKD_TORCH_VERSION ""
#endif

namespace fastkd {
#ifdef FASTKD_WITH_CUDA
int cuda_compiled_version();  // defined in cuda/kd_cuda.cu
#endif
}  // namespace fastkd

TORCH_LIBRARY(fastkd, m) {
  // Response-based losses, fused forward: per-row soft loss (a divergence of csrc/include/fastkd/divergences.h
  // by name, with its parameters in registry order, e.g. "jsd" [beta], "dkd" [alpha, beta]) and, when
  // hard_weight != 0, the student's cross-entropy on the labels at temperature 1, plus (when asked) the
  // gradients of the reduced loss = soft_weight * soft + hard_weight * hard with respect to student and
  // teacher, computed in the same pass over the logits.
  //   student, teacher: [rows, vocab]; labels: [rows] integer or None (rows == ignore_index are not
  //   counted; class targets of the CE and of "dkd"); num_items: scalar divisor replacing the counted rows
  //   in batchmean/mean, or None.
  //   row_temperature [rows]: a temperature per row (replaces temperature); row_weight [rows]: multiplies each
  //   row's loss and gradients (not the divisor); standardize: each row of both sides becomes (z - mean) /
  //   (standardize_eps + std) (unbiased std) before the temperature (row_options.h).
  // Returns (loss, soft, hard, grad_student, grad_teacher, grad_temperature); soft and hard are the reduced
  // parts; grad_temperature [rows] is d loss / d row_temperature (grad_temperature=True); a gradient not asked
  // for is an empty tensor.
  m.def(
      "response_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor? num_items, str divergence, "
      "float[] params, float temperature, float soft_weight, float hard_weight, int ignore_index, "
      "str reduction, bool scale_by_temperature, bool grad_student, bool grad_teacher, "
      "Tensor? row_temperature=None, Tensor? row_weight=None, bool standardize=False, float standardize_eps=1e-7, "
      "bool grad_temperature=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // KD against a sparse teacher: k kept entries per row (values: logits, or log-probabilities used as
  // given; indices into the vocabulary), the student's full row. tail_bucket keeps the teacher's missing
  // mass as one extra bucket. row_weight [rows]: token weights; row_temperature [rows]: a temperature per row
  // (replaces temperature; the teacher's too for logits), as response_forward. Returns (loss, grad_student,
  // grad_temperature), grad_temperature [rows] = d loss / d row_temperature (grad_temperature=True), a gradient
  // not asked for an empty tensor.
  m.def(
      "topk_kd_forward(Tensor student, Tensor values, Tensor indices, Tensor? labels, Tensor? num_items, "
      "float temperature, bool values_are_logprobs, bool tail_bucket, int ignore_index, str reduction, "
      "bool scale_by_temperature, bool grad_student, Tensor? row_weight=None, Tensor? row_temperature=None, "
      "bool grad_temperature=False) -> (Tensor, Tensor, Tensor)");
  // The per-entry phases of a divergence over one vocabulary range (a tensor-parallel rank's shard), given the
  // rows' global statistics stats [rows, 4] = (shift_s, shift_t, log_zs, log_zt) with log p = (t - shift_t) / T -
  // log_zt (fastkd.distributed all-reduces them and the sums between the phases; shard_host.h). float32 or
  // float64 inputs of one dtype; not differentiable (the caller's autograd uses the second). row_temperature
  // [rows]: a temperature per row (replaces temperature).
  //   terms: [rows, 2] = the range's sum phi and sum psi_q (psi_q = q dphi/dq); with dots [rows, 7], also the
  //          range's parts of the temperature gradient's row dots: sum psi_p, sum log p psi_p, sum p log p,
  //          sum log q psi_q, sum q log q (row_options.h: psi_row_dot);
  //   grad:  [rows, width] = row_coef * (psi_q - q * sum_psi_q), sum_psi_q over the whole vocabulary.
  m.def(
      "response_shard_terms(Tensor student, Tensor teacher, Tensor stats, str divergence, float[] params, "
      "float temperature, Tensor? row_temperature=None, bool dots=False) -> Tensor");
  m.def(
      "response_shard_grad(Tensor student, Tensor teacher, Tensor stats, Tensor row_coef, Tensor sum_psi_q, "
      "str divergence, float[] params, float temperature, Tensor? row_temperature=None) -> Tensor");

  // Distillation through the student's linear head, never holding the [rows, vocab] logits: rows in chunks
  // of chunk_size, logits = hidden @ weight^T + bias, then the response kernel (any divergence but "dkd";
  // top-k teacher: "kl") writing the logit gradient in place, then the gradients of hidden, weight and bias
  // by GEMMs (weight and bias accumulated in float32). The teacher is exactly one of: teacher_logits
  // [rows, Vt]; a head teacher_hidden [rows, Ht], teacher_weight [Vt, Ht], teacher_bias [Vt]; a top-k teacher
  // topk_values / topk_indices [rows, k]. Vt <= vocab: the student's extra columns get teacher probability 0.
  // The teacher gets no gradient. grad_rows [rows] (reduction "none" only) weights each row's loss in the
  // gradients (the backward of reduction "none"). Each head's logits z become softcap(logit_scale * z),
  // softcap(x) = cap * tanh(x / cap) (scale 1 and cap 0: unchanged; the teacher's: not for a top-k teacher).
  // The logits are float32 (float64) whatever the input dtype. row_weight [rows] (token weights) multiplies
  // each row's loss and gradients; standardize as response_forward (not for a top-k teacher); row_temperature
  // [rows] a temperature per row (not for "cosine"), grad_temperature its gradient. Other arguments as
  // response_forward / topk_kd_forward.
  // Returns (loss, soft, hard, grad_hidden, grad_weight, grad_bias, grad_temperature); a gradient not asked for is
  // empty.
  m.def(
      "fused_linear_kd_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_logits, "
      "Tensor? teacher_hidden, Tensor? teacher_weight, Tensor? teacher_bias, Tensor? topk_values, "
      "Tensor? topk_indices, Tensor? labels, Tensor? num_items, Tensor? grad_rows, str divergence, "
      "float[] params, float temperature, float soft_weight, float hard_weight, int ignore_index, str reduction, "
      "bool scale_by_temperature, bool values_are_logprobs, bool tail_bucket, int chunk_size, "
      "float student_logit_scale, float student_softcap, float teacher_logit_scale, float teacher_softcap, "
      "bool grad_hidden, bool grad_weight, bool grad_bias, Tensor? row_weight=None, bool standardize=False, "
      "float standardize_eps=1e-7, Tensor? row_temperature=None, bool grad_temperature=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Relation- and feature-based losses: schemas and descriptions in fastkd/relation_ops.h.
#define FASTKD_DEF_RELATION_OP(op, Traits) m.def(fastkd::relation_ops::Traits::schema);
  FASTKD_RELATION_OPS(FASTKD_DEF_RELATION_OP)
#undef FASTKD_DEF_RELATION_OP
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastkd compiled extension: operator schemas, CUDA kernels and build introspection";
  m.def("build_info", [] {
    pybind11::dict d;
#ifdef FASTKD_WITH_CUDA
    d["cuda"] = true;
    d["cuda_version"] = fastkd::cuda_compiled_version();
#else
    d["cuda"] = false;
    d["cuda_version"] = pybind11::none();
#endif
    d["cuda_archs"] = std::string(FASTKD_CUDA_ARCHS);
    d["built_with_torch"] = std::string(FASTKD_TORCH_VERSION);
    return d;
  }, "What the compiled extension contains (CUDA compiled, CUDA archs, torch it was built with).");
  m.def("divergences", [] {
    using namespace fastkd;
    pybind11::list out;
    static const char* kFamilies[] = {"kl_type", "psi", "decoupled"};
#define FASTKD_DIV_DESCRIBE(id, trait, family)                                                              \
  {                                                                                                       \
    pybind11::list params;                                                                                \
    for (int i = 0; i < trait::kNumParams; ++i) {                                                         \
      const fastkd::ParamSpec& p = trait::kParams[i];                                                     \
      params.append(pybind11::make_tuple(p.name, p.default_value, p.lo, p.hi, p.lo_open, p.hi_open));     \
    }                                                                                                     \
    pybind11::dict d;                                                                                     \
    d["name"] = trait::kName;                                                                             \
    d["family"] = kFamilies[static_cast<int>(trait::kFamily)];                                            \
    d["params"] = params;                                                                                 \
    out.append(d);                                                                                        \
  }
    FASTKD_DIVERGENCES(FASTKD_DIV_DESCRIBE)
#undef FASTKD_DIV_DESCRIBE
    return out;
  }, "The compiled divergence registry (csrc/include/fastkd/divergences.h), in order: name, family and "
     "parameters (name, default, lo, hi, lo_open, hi_open).");
}

// DIST (csrc/include/fastkd/dist_host.h): loss = tau^2 (beta inter + gamma intra) of [rows, classes] logits,
// returning (loss, grad_student, grad_teacher).
#include "fastkd/dist_host.h"
TORCH_LIBRARY_FRAGMENT(fastkd, m) { m.def(fastkd::DistOp::schema); }

// Cosine distillation (issue 14): its schema and description in fastkd/cosine_ops.h.
#include "fastkd/cosine_ops.h"
TORCH_LIBRARY_FRAGMENT(fastkd, m) { m.def(fastkd::cosine_ops::Cosine::schema); }
