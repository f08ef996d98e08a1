// CPU implementation of fastkd::kd_forward.
//
// This translation unit is compiled once per instruction set (DEFAULT, AVX2, AVX512), each time into its
// own shared library with the matching -m flags and CPU_CAPABILITY macros, so that at::vec::Vectorized
// really is 8 or 16 lanes wide; fastkd/_ops_loader.py loads the one library the CPU supports (the same
// rule as ATen's own kernels, including the ATEN_CPU_CAPABILITY override).
//
// Work split: rows in parallel (at::parallel_for), each row handled by one thread in three sweeps:
//   1. row maxima of student and teacher (streams the row from memory),
//   2. Z_s, Z_t and sum e_t (a - b) -> the row's KL (the row is now in L2 for vocabularies up to ~64k),
//   3. gradients, written once into fresh memory.
// The per-element formulas are the FASTKD_HOST_DEVICE templates of kd_math.h, the same ones the CUDA
// kernels use; here they are instantiated with Vectorized<acc> and, for row tails, with scalars.
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "fastkd/kd_host.h"

// Vector overloads of the kd_math.h primitives. They live in Vectorized's own namespace so that the
// templates in kd_math.h find them by argument-dependent lookup.
namespace at::vec {
inline namespace CPU_CAPABILITY {
// exp_u20: ATen's polynomial exp (the one its softmax kernels use), a few ulp, no Sleef call.
inline Vectorized<float> fk_exp(const Vectorized<float>& x) {
  return x.exp_u20();
}
inline Vectorized<double> fk_exp(const Vectorized<double>& x) {
  return x.exp();
}
template <typename A>
inline Vectorized<A> fk_select_positive(const Vectorized<A>& cond, const Vectorized<A>& value) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), value, cond > Vectorized<A>(A(0)));
}
}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace fastkd {
namespace {

template <typename Acc>
using Vec = at::vec::Vectorized<Acc>;

// Loads Vec<Acc>::size() elements of X as Acc.
template <typename Acc, typename X>
inline Vec<Acc> load(const X* ptr) {
  if constexpr (std::is_same_v<X, Acc>) {
    return Vec<Acc>::loadu(ptr);
  } else {
    static_assert(std::is_same_v<Acc, float>, "reduced types accumulate in float");
    Vec<float> out;
    at::vec::load_to_float(ptr, out);
    return out;
  }
}

// Stores Vec<Acc>::size() elements as X.
template <typename X, typename Acc>
inline void store(X* ptr, const Vec<Acc>& v) {
  if constexpr (std::is_same_v<X, Acc>) {
    v.store(ptr);
  } else {
    at::vec::convert_from_float<X>(v, v).store(ptr, Vec<Acc>::size());
  }
}

// Row tails (fewer than a vector's worth of entries) go through the same vector code: missing lanes read
// as -inf, which every sweep turns into "no mass" (exp(-inf) = 0, dot term 0), and are not written back.
template <typename Acc, typename X>
inline Vec<Acc> load_tail(const X* ptr, int64_t n) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  for (int64_t k = 0; k < Vec<Acc>::size(); ++k) {
    buf[k] = k < n ? static_cast<Acc>(ptr[k]) : -std::numeric_limits<Acc>::infinity();
  }
  return Vec<Acc>::loadu(buf);
}

template <typename X, typename Acc>
inline void store_tail(X* ptr, const Vec<Acc>& v, int64_t n) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  for (int64_t k = 0; k < n; ++k) ptr[k] = static_cast<X>(buf[k]);
}

template <typename Acc>
inline Acc lane_max(const Vec<Acc>& v) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  Acc m = buf[0];
  for (int i = 1; i < Vec<Acc>::size(); ++i) m = kd_nan_max(m, buf[i]);
  return m;
}

// Lane sum in a fixed order, in double: the row's result does not depend on anything but its data.
template <typename Acc>
inline double lane_sum(const Vec<Acc>& v) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  double s = 0.0;
  for (int i = 0; i < Vec<Acc>::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

template <typename S, typename T, typename Acc>
void kd_rows(const KdParams& p, int64_t counted_rows, int64_t begin, int64_t end) {
  constexpr int64_t W = Vec<Acc>::size();
  // Parking e_s in the gradient row needs full precision there.
  constexpr bool kParkEs = std::is_same_v<S, Acc>;
  constexpr int64_t kSumBlock = 64 * W;
  const int64_t V = p.vocab;
  const int64_t V2 = V - V % (2 * W);  // body handled two vectors at a time
  const Vec<Acc> inv_t_v(static_cast<Acc>(p.inv_temperature));
  const Vec<Acc> coef_v(static_cast<Acc>(kd_grad_coef(p, counted_rows)));
  auto* S_out = static_cast<S*>(p.grad_student);
  auto* T_out = static_cast<T*>(p.grad_teacher);
  auto* row_loss = static_cast<Acc*>(p.row_loss);

  for (int64_t r = begin; r < end; ++r) {
    const S* s = static_cast<const S*>(p.student) + r * p.student_row_stride;
    const T* t = static_cast<const T*>(p.teacher) + r * p.teacher_row_stride;
    S* gs = S_out ? S_out + r * V : nullptr;
    T* gt = T_out ? T_out + r * V : nullptr;

    if (!kd_row_counted(p.labels, r, p.ignore_index)) {
      row_loss[r] = Acc(0);
      if (gs) std::fill(gs, gs + V, S(0));
      if (gt) std::fill(gt, gt + V, T(0));
      continue;
    }

    // Sweep 1: row maxima.
    const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    Vec<Acc> ms0(neg_inf), ms1(neg_inf), mt0(neg_inf), mt1(neg_inf);
    for (int64_t i = 0; i < V2; i += 2 * W) {
      ms0 = at::vec::maximum(ms0, load<Acc>(s + i));
      ms1 = at::vec::maximum(ms1, load<Acc>(s + i + W));
      mt0 = at::vec::maximum(mt0, load<Acc>(t + i));
      mt1 = at::vec::maximum(mt1, load<Acc>(t + i + W));
    }
    for (int64_t i = V2; i < V; i += W) {
      ms0 = at::vec::maximum(ms0, load_tail<Acc>(s + i, std::min(W, V - i)));
      mt0 = at::vec::maximum(mt0, load_tail<Acc>(t + i, std::min(W, V - i)));
    }
    const Acc max_s = lane_max<Acc>(at::vec::maximum(ms0, ms1));
    const Acc max_t = lane_max<Acc>(at::vec::maximum(mt0, mt1));

    // Sweep 2: Z_s, Z_t and sum e_t (a - b). When only the student gradient is wanted and it has the
    // accumulation type, e_s is parked in the gradient row (first touch of that memory happens here), so
    // that sweep 3 computes one exponential per entry instead of two.
    const bool park = kParkEs && gs != nullptr && gt == nullptr;
    // Sums are blocked: vector lanes accumulate kSumBlock entries, then flush into double, so the
    // rounding error does not grow with the vocabulary size.
    const Vec<Acc> max_s_v(max_s), max_t_v(max_t);
    double z_s = 0.0, z_t = 0.0, dot = 0.0;
    for (int64_t blk = 0; blk < V2; blk += kSumBlock) {
      const int64_t blk_end = std::min(V2, blk + kSumBlock);
      Vec<Acc> zs0(0), zs1(0), zt0(0), zt1(0), d0(0), d1(0);
      for (int64_t i = blk; i < blk_end; i += 2 * W) {
        const Vec<Acc> a0 = kd_shift(load<Acc>(t + i), max_t_v, inv_t_v);
        const Vec<Acc> a1 = kd_shift(load<Acc>(t + i + W), max_t_v, inv_t_v);
        const Vec<Acc> b0 = kd_shift(load<Acc>(s + i), max_s_v, inv_t_v);
        const Vec<Acc> b1 = kd_shift(load<Acc>(s + i + W), max_s_v, inv_t_v);
        const Vec<Acc> et0 = fk_exp(a0), et1 = fk_exp(a1);
        const Vec<Acc> es0 = fk_exp(b0), es1 = fk_exp(b1);
        if (park) {
          store<S>(gs + i, es0);
          store<S>(gs + i + W, es1);
        }
        zs0 += es0;
        zs1 += es1;
        zt0 += et0;
        zt1 += et1;
        d0 += kd_dot_term(et0, a0, b0);
        d1 += kd_dot_term(et1, a1, b1);
      }
      z_s += lane_sum<Acc>(zs0 + zs1);
      z_t += lane_sum<Acc>(zt0 + zt1);
      dot += lane_sum<Acc>(d0 + d1);
    }
    for (int64_t i = V2; i < V; i += W) {
      const int64_t n = std::min(W, V - i);
      const Vec<Acc> a = kd_shift(load_tail<Acc>(t + i, n), max_t_v, inv_t_v);
      const Vec<Acc> b = kd_shift(load_tail<Acc>(s + i, n), max_s_v, inv_t_v);
      const Vec<Acc> et = fk_exp(a), es = fk_exp(b);
      if (park) store_tail<S>(gs + i, es, n);
      z_s += lane_sum<Acc>(es);
      z_t += lane_sum<Acc>(et);
      dot += lane_sum<Acc>(kd_dot_term(et, a, b));
    }
    const double kl = kd_row_kl(z_s, z_t, dot);
    row_loss[r] = static_cast<Acc>(p.loss_factor * kl);
    if (!gs && !gt) continue;

    // Sweep 3: gradients.
    const Vec<Acc> log_zs_v(static_cast<Acc>(std::log(z_s))), log_zt_v(static_cast<Acc>(std::log(z_t)));
    const Vec<Acc> kl_v(static_cast<Acc>(kl));
    if (park) {
      const Vec<Acc> inv_zs_v(static_cast<Acc>(1.0 / z_s));
      for (int64_t i = 0; i + W <= V; i += W) {
        const Vec<Acc> a = kd_shift(load<Acc>(t + i), max_t_v, inv_t_v);
        store<S>(gs + i, kd_grad_student_from_es(load<Acc>(gs + i), inv_zs_v, a, log_zt_v, coef_v));
      }
      for (int64_t i = V - V % W; i < V; i += W) {
        const int64_t n = V - i;
        const Vec<Acc> a = kd_shift(load_tail<Acc>(t + i, n), max_t_v, inv_t_v);
        store_tail<S>(gs + i, kd_grad_student_from_es(load_tail<Acc>(gs + i, n), inv_zs_v, a, log_zt_v, coef_v), n);
      }
      continue;
    }
    for (int64_t i = 0; i + W <= V; i += W) {
      const Vec<Acc> a = kd_shift(load<Acc>(t + i), max_t_v, inv_t_v);
      const Vec<Acc> b = kd_shift(load<Acc>(s + i), max_s_v, inv_t_v);
      if (gs) store<S>(gs + i, kd_grad_student(a, b, log_zt_v, log_zs_v, coef_v));
      if (gt) store<T>(gt + i, kd_grad_teacher(a, b, log_zt_v, log_zs_v, kl_v, coef_v));
    }
    for (int64_t i = V - V % W; i < V; i += W) {
      const int64_t n = V - i;
      const Vec<Acc> a = kd_shift(load_tail<Acc>(t + i, n), max_t_v, inv_t_v);
      const Vec<Acc> b = kd_shift(load_tail<Acc>(s + i, n), max_s_v, inv_t_v);
      if (gs) store_tail<S>(gs + i, kd_grad_student(a, b, log_zt_v, log_zs_v, coef_v), n);
      if (gt) store_tail<T>(gt + i, kd_grad_teacher(a, b, log_zt_v, log_zs_v, kl_v, coef_v), n);
    }
  }
}

// Gradient buffers are written exactly once into fresh memory, and on Linux the page faults of that first
// touch (4 KiB each) can cost more than the kernel itself. Large buffers are therefore allocated 2 MiB
// aligned and marked MADV_HUGEPAGE (a hint: a no-op where transparent huge pages are disabled).
at::Tensor alloc_grad_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < 4 * kHuge) return at::empty(sizes, options);
  const size_t padded = (bytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, padded) != 0) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  madvise(ptr, padded, MADV_HUGEPAGE);
#endif
  return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                              const std::optional<at::Tensor>& labels,
                                                              double temperature, int64_t ignore_index,
                                                              c10::string_view reduction, bool scale_by_temperature,
                                                              bool grad_student, bool grad_teacher) {
  KdCall c = kd_prepare(student, teacher, labels, temperature, ignore_index,
                        std::string_view(reduction.data(), reduction.size()), scale_by_temperature, grad_student,
                        grad_teacher, alloc_grad_cpu);
  const KdParams& p = c.p;
  if (p.rows > 0) {
    const int64_t counted = c.count.defined() ? c.count.item<int64_t>() : p.rows;
    // About 8k elements per task: enough to amortize a thread wake-up, small enough that vision-size
    // batches ([256, 100]) already use every thread.
    const int64_t grain = std::max<int64_t>(1, 8192 / p.vocab);
    kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
      using S = decltype(s_tag);
      using T = decltype(t_tag);
      using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
      at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { kd_rows<S, T, Acc>(p, counted, b, e); });
    });
  }
  return kd_outputs(c);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_forward", &kd_forward_cpu);
}

}  // namespace fastkd
