// The plain-data boundary between ATen code and the response-loss kernels: pointers, sizes, strides,
// scalars. Kernels never see an at::Tensor.
#pragma once

#include <cstdint>

#include "fastkd/divergences.h"

namespace fastkd {

// What a loss computes, independent of where its rows come from: the divergence and its parameters, the
// temperature, the weights of the soft and hard parts, the masking and the reduction. Built and validated in
// one place (kd_host.h make_loss_config) for the response op, the top-k op and the fused linear head, whose
// row-level parameter structs below extend it with pointers, sizes and strides.
struct LossConfig {
  Divergence divergence = Divergence::KL;
  DivArgs div;                          // the divergence's parameters (registry order) and derived constants
  double inv_temperature = 1.0;
  double loss_factor = 1.0;             // T^2 or 1
  bool scale_by_temperature = false;    // whether loss_factor is T^2 (per-row temperatures: each row's T^2)
  double soft_weight = 1.0;
  double hard_weight = 0.0;
  bool hard = false;                    // compute the cross-entropy part (needs labels)
  int64_t ignore_index = -100;
  Reduction reduction = Reduction::BatchMean;
  // Logit standardization (LSKD, CVPR 2024): each row of both sides becomes (z - mean) / (eps + std) (unbiased
  // std) before the temperature; the exact gradient goes through mean and std (row_options.h).
  bool standardize = false;
  double standardize_eps = 1e-7;
};

// fastkd::response_forward: one row of student and teacher logits -> a soft (divergence) loss and,
// optionally, the hard-label cross-entropy of the student, plus the gradients of
// soft_weight * soft + hard_weight * hard after reduction.
struct KdParams : LossConfig {
  const void* student = nullptr;        // [rows, vocab], unit stride along vocab
  const void* teacher = nullptr;        // [rows, vocab], unit stride along vocab
  const int64_t* labels = nullptr;      // [rows] or nullptr: masks rows == ignore_index; CE / DKD target
  const double* count = nullptr;        // device scalar: counted rows or num_items_in_batch; nullptr = rows
  void* grad_student = nullptr;         // [rows, vocab] contiguous, or nullptr when not requested
  void* grad_teacher = nullptr;         // [rows, vocab] contiguous, or nullptr when not requested
  void* row_soft = nullptr;             // [rows] of the accumulation type: loss_factor * divergence
  void* row_hard = nullptr;             // [rows] of the accumulation type: cross-entropy (when hard)
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  // Per-row options (row_options.h), each [rows] float64 or nullptr: a temperature per row (replaces
  // inv_temperature), a weight per row (multiplies the row's loss and gradients; the divisor is unchanged),
  // and the output d(reduced loss) / d(row temperature).
  const double* row_temperature = nullptr;
  const double* row_weight = nullptr;
  double* row_grad_temperature = nullptr;
};

// fastkd::topk_kd_forward: a sparse teacher (k kept entries per row) against the full student row
// (divergence KL; the soft weight is applied by the caller).
struct TopkParams : LossConfig {
  const void* student = nullptr;        // [rows, vocab], unit stride along vocab
  const void* values = nullptr;         // [rows, k] contiguous: teacher logits or log-probabilities
  const int64_t* indices = nullptr;     // [rows, k] contiguous, each row sorted ascending and distinct
  const int64_t* labels = nullptr;
  const double* count = nullptr;
  void* grad_student = nullptr;
  void* row_soft = nullptr;
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t k = 0;
  int64_t student_row_stride = 0;
  bool values_are_logprobs = false;
  bool tail_bucket = false;
  // Per-row options (row_options.h), as KdParams': token weights, a temperature per row (replaces
  // inv_temperature; also the teacher's for logits), and the output d(reduced loss) / d(row temperature).
  const double* row_weight = nullptr;
  const double* row_temperature = nullptr;
  double* row_grad_temperature = nullptr;
};

// A top-k row's weight (1 without token weights).
FASTKD_HOST_DEVICE double topk_row_weight(const TopkParams& p, int64_t r) {
  return p.row_weight ? p.row_weight[r] : 1.0;
}

FASTKD_HOST_DEVICE double kd_count(const double* count, int64_t rows) {
  return count ? *count : static_cast<double>(rows);
}

// d(reduced loss) / d(student logit) factor of the soft part: soft_weight * loss_factor / denominator,
// and the chain rule through x / T adds 1 / T.
template <class RowParams>  // KdParams or TopkParams
FASTKD_HOST_DEVICE double kd_grad_coef(const RowParams& p, double count) {
  return p.soft_weight * p.loss_factor * p.inv_temperature / kd_denominator(p.reduction, count, p.vocab);
}

// The same for the hard part (cross-entropy at temperature 1).
FASTKD_HOST_DEVICE double ce_grad_coef(const KdParams& p, double count) {
  return p.hard_weight / ce_denominator(p.reduction, count);
}

}  // namespace fastkd
