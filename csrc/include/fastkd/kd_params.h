// The plain-data boundary between ATen code and the KD kernels: pointers, sizes, strides, scalars.
#pragma once

#include <cstdint>

#include "fastkd/kd_math.h"

namespace fastkd {

struct KdParams {
  const void* student = nullptr;        // [rows, vocab], unit stride along vocab
  const void* teacher = nullptr;        // [rows, vocab], unit stride along vocab
  const int64_t* labels = nullptr;      // [rows] or nullptr
  const int64_t* counted_rows = nullptr;  // device-side count of rows whose label != ignore_index, or nullptr (= rows)
  void* grad_student = nullptr;         // [rows, vocab] contiguous, or nullptr when not requested
  void* grad_teacher = nullptr;         // [rows, vocab] contiguous, or nullptr when not requested
  void* row_loss = nullptr;             // [rows] of the accumulation type (float, or double for fp64)
  int64_t rows = 0;
  int64_t vocab = 0;
  int64_t student_row_stride = 0;
  int64_t teacher_row_stride = 0;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  double loss_factor = 1.0;             // T^2 or 1
  Reduction reduction = Reduction::BatchMean;
};

// Factor applied to every gradient entry: d(loss)/d(row KL) = loss_factor / denominator, and the
// chain rule through x / T adds 1 / T.
FASTKD_HOST_DEVICE double kd_grad_coef(const KdParams& p, int64_t counted_rows) {
  const double denom = (p.reduction == Reduction::None || p.reduction == Reduction::Sum)
                           ? 1.0
                           : kd_denominator(p.reduction, counted_rows, p.vocab);
  return p.loss_factor * p.inv_temperature / denom;
}

}  // namespace fastkd
