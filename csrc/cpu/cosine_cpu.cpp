// CPU implementation of fastkd::cosine_forward: per row beta * (1 - cos(s, t)) on the raw logits, optionally plus
// alpha * the student's hard-label cross-entropy (temperature 1), and the gradients of the reduced loss.
//
// Rows in parallel (at::parallel_for), each row by one thread in sweeps over at::vec::Vectorized lanes:
//   1. <s, t>, ||s||^2, ||t||^2, the number of live entries (not -inf on both sides) and, with the
//      cross-entropy, the student's maximum (the row streams from memory once; it then sits in L2);
//   2. cross-entropy only: sum exp(s - max);
//   3. gradients, written once into fresh memory.
// The per-row scalars are cosine_math.h's, shared with the CUDA kernel.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include "cosine_rows.h"
#include "cpu_common.h"

namespace at::vec {
inline namespace CPU_CAPABILITY {
// Vector form of cosine_math.h's entry mask: lanes -inf on both sides read as 0 in both; returns 1 for the
// live lanes, 0 for the masked ones.
template <typename A>
inline Vectorized<A> cosine_live(Vectorized<A>& s, Vectorized<A>& t) {
  const Vectorized<A> ninf(-std::numeric_limits<A>::infinity()), zero(A(0));
  const Vectorized<A> both = (s == ninf) & (t == ninf);
  s = Vectorized<A>::blendv(s, zero, both);
  t = Vectorized<A>::blendv(t, zero, both);
  return Vectorized<A>::blendv(Vectorized<A>(A(1)), zero, both);
}
}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace fastkd {
namespace cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename S, typename T, typename GS, typename GT, typename Acc>
void cosine_rows(const CosineParams& p, double divisor, int64_t begin, int64_t end) {
  using V = Vec<Acc>;
  constexpr int64_t W = V::size();
  const int64_t vocab = p.vocab, body = vocab - vocab % W, tail = vocab - body;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const double row_scale = 1.0 / divisor;
  for (int64_t row = begin; row < end; ++row) {
    const S* s = static_cast<const S*>(p.student) + row * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_row_stride;
    GS* gs = p.grad_student ? static_cast<GS*>(p.grad_student) + row * p.grad_student_row_stride : nullptr;
    GT* gt = p.grad_teacher ? static_cast<GT*>(p.grad_teacher) + row * p.grad_teacher_row_stride : nullptr;
    const bool counted = kd_row_counted(p.labels, row, p.ignore_index);
    Acc* row_soft = static_cast<Acc*>(p.row_soft) + row;
    Acc* row_hard = p.hard ? static_cast<Acc*>(p.row_hard) + row : nullptr;
    if (!counted) {
      *row_soft = Acc(0);
      if (row_hard) *row_hard = Acc(0);
      if (gs) std::fill(gs, gs + vocab, GS(0));
      if (gt) std::fill(gt, gt + vocab, GT(0));
      continue;
    }
    // sweep 1: the sums (and the student's maximum for the cross-entropy)
    V vmax(ninf);
    auto sums = blocked_sums<Acc, 4>(0, body, [&](int64_t i) {
      V a = load<Acc>(s + i), b = load<Acc>(t + i);
      if (p.hard) vmax = at::vec::maximum(vmax, a);
      const V live = at::vec::cosine_live(a, b);
      return std::array<V, 4>{a * b, a * a, b * b, live};
    });
    double st = sums[0], ss = sums[1], tt = sums[2], live = sums[3];
    Acc max_s = p.hard ? lane_max<Acc>(vmax) : Acc(0);
    for (int64_t j = body; j < vocab; ++j) {  // tail, in the same order every time
      Acc a = static_cast<Acc>(s[j]), b = static_cast<Acc>(t[j]);
      if (p.hard) max_s = kd_nan_max(max_s, a);
      if (!cosine_drop_masked(a, b)) live += 1.0;
      st += static_cast<double>(a * b);
      ss += static_cast<double>(a * a);
      tt += static_cast<double>(b * b);
    }
    const CosineRow r = cosine_row(st, ss, tt, live, p.eps);
    *row_soft = static_cast<Acc>(r.value);
    // sweep 2: the cross-entropy's normalizer
    const bool ce = p.hard && live != 0.0;  // a fully masked row contributes 0 to both terms
    double lse = 0.0;
    int64_t y = -1;
    if (ce) {
      const V m(max_s);
      auto e = blocked_sums<Acc, 1>(0, body, [&](int64_t i) {
        return std::array<V, 1>{at::vec::fk_exp(load<Acc>(s + i) - m)};
      });
      double z = e[0];
      for (int64_t j = body; j < vocab; ++j) z += static_cast<double>(fk_exp(static_cast<Acc>(s[j]) - max_s));
      y = p.labels[row];
      lse = static_cast<double>(max_s) + std::log(z);
      *row_hard = static_cast<Acc>(lse - static_cast<double>(s[y]));
    } else if (row_hard) {
      *row_hard = Acc(0);
    }
    if (!gs && !gt) continue;
    // the label's entry, read before sweep 3 (the fused head writes the gradient over the logits, in place)
    const Acc s_y = ce ? static_cast<Acc>(s[y]) : Acc(0), t_y = ce ? static_cast<Acc>(t[y]) : Acc(0);
    // sweep 3: gradients. g_s = w (cross t + self_s s) + h softmax(s) - h [j == y], g_t = w (cross s + self_t t)
    const double w = p.beta * row_scale, h = ce ? p.hard_weight * row_scale : 0.0;
    const Acc cross = static_cast<Acc>(w * r.cross), self_s = static_cast<Acc>(w * r.self_s),
              self_t = static_cast<Acc>(w * r.self_t), hw = static_cast<Acc>(h), lse_a = static_cast<Acc>(lse);
    const V vcross(cross), vself_s(self_s), vself_t(self_t), vh(hw), vlse(lse_a);
    const auto grad_vec = [&](const V& a_raw, const V& b_raw, V& g_s, V& g_t) {
      V a = a_raw, b = b_raw;
      at::vec::cosine_live(a, b);
      g_s = vcross * b + vself_s * a;
      if (ce) g_s = g_s + vh * at::vec::fk_exp(a_raw - vlse);
      g_t = vcross * a + vself_t * b;
    };
    for (int64_t i = 0; i < body; i += W) {
      V g_s, g_t;
      grad_vec(load<Acc>(s + i), load<Acc>(t + i), g_s, g_t);
      if (gs) store<GS>(gs + i, g_s);
      if (gt) store<GT>(gt + i, g_t);
    }
    if (tail > 0) {
      V g_s, g_t;
      grad_vec(load_tail<Acc>(s + body, tail, ninf), load_tail<Acc>(t + body, tail, ninf), g_s, g_t);
      if (gs) store_tail<GS>(gs + body, g_s, tail);
      if (gt) store_tail<GT>(gt + body, g_t, tail);
    }
    if (ce && gs) {  // the label's entry, recomputed in Acc and rounded once
      Acc a = s_y, b = t_y;
      const Acc a_raw = a;
      cosine_drop_masked(a, b);
      gs[y] = static_cast<GS>(cross * b + self_s * a + hw * fk_exp(a_raw - lse_a) - hw);
    }
  }
}

template <typename X>
using GradOf = std::conditional_t<std::is_same_v<X, at::Half>, float, X>;

}  // namespace

void run_cosine(const CosineParams& p, at::ScalarType student, at::ScalarType teacher) {
  const double divisor = cosine_divisor(p.reduction, p.count, p.rows);
  const int64_t grain = std::max<int64_t>(1, 8192 / p.vocab);
  kd_dispatch_pair(student, teacher, [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) {
      cosine_rows<S, T, GradOf<S>, GradOf<T>, Acc>(p, divisor, b, e);
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cosine_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& num_items, double beta, double hard_weight, double eps, int64_t ignore_index,
    c10::string_view reduction, bool grad_student, bool grad_teacher) {
  CosineCall c = cosine_prepare(student, teacher, labels, num_items, beta, hard_weight, eps, ignore_index, reduction,
                                grad_student, grad_teacher, alloc_grad);
  if (c.p.rows > 0) run_cosine(c.p, c.student.scalar_type(), c.teacher.scalar_type());
  return cosine_outputs(c);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("cosine_forward", &cpu::cosine_forward_cpu);
}

}  // namespace fastkd
