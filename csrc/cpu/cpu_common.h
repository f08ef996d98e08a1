// Helpers shared by the CPU kernels. Every CPU source is compiled once per instruction set (DEFAULT, AVX2,
// AVX512), each time into its own shared library with the matching -m flags and CPU_CAPABILITY macros, so
// that at::vec::Vectorized really is 8 or 16 lanes wide; fastkd/_ops_loader.py loads the one library the
// CPU supports (the same rule as ATen's own kernels, including the ATEN_CPU_CAPABILITY override).
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>

#include "fastkd/divergences.h"

// Vector overloads of the kd_math.h primitives. They live in Vectorized's own namespace so that the
// templates in kd_math.h find them by argument-dependent lookup.
namespace at::vec {
inline namespace CPU_CAPABILITY {
// exp_u20: ATen's polynomial exp (the one its softmax kernels use), a few ulp, no Sleef call. It maps NaN
// to a number (inf), which would let a NaN logit turn into a finite or infinite loss: NaN lanes are put back.
inline Vectorized<float> fk_exp(const Vectorized<float>& x) {
  return Vectorized<float>::blendv(x.exp_u20(), x, x != x);
}
inline Vectorized<double> fk_exp(const Vectorized<double>& x) {
  return x.exp();
}
template <typename A>
inline Vectorized<A> fk_log(const Vectorized<A>& x) {
  return x.log();
}
template <typename A>
inline Vectorized<A> fk_log_prob(const Vectorized<A>& x) {
  return x.log();
}
// log(x) = e ln 2 + log(m), x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = log(1 + f) by the classic
// degree-8 minimax polynomial in f (Cephes' single-precision coefficients), ln 2 split in two parts so
// e ln 2 adds no rounding error. About an ulp for normal x; x = 0 and denormals give a finite value near
// -88 to -104 (the JSD terms select such lanes away). 3x cheaper than Sleef's u10 log on AVX2.
inline Vectorized<float> fk_log_prob(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V mant_bits(c10::bit_cast<float>(0x007fffff)), exp_bits(c10::bit_cast<float>(0x7f800000));
  V m = (x & mant_bits) | V(1.0f);  // [1, 2)
  V e = convert_to_fp_of_same_size<float>(cast<int32_t>(x & exp_bits)) * V(1.0f / 8388608.0f) - V(127.0f);
  const V big = m > V(1.41421356237f);
  m = V::blendv(m, m * V(0.5f), big);
  e = V::blendv(e, e + V(1.0f), big);
  const V f = m - V(1.0f);
  const V z = f * f;
  V poly(7.0376836292e-2f);
  poly = fmadd(poly, f, V(-1.1514610310e-1f));
  poly = fmadd(poly, f, V(1.1676998740e-1f));
  poly = fmadd(poly, f, V(-1.2420140846e-1f));
  poly = fmadd(poly, f, V(1.4249322787e-1f));
  poly = fmadd(poly, f, V(-1.6668057665e-1f));
  poly = fmadd(poly, f, V(2.0000714765e-1f));
  poly = fmadd(poly, f, V(-2.4999993993e-1f));
  poly = fmadd(poly, f, V(3.3333331174e-1f));
  V y = poly * f * z;
  y = fmadd(e, V(-2.12194440e-4f), y);
  y = fmadd(z, V(-0.5f), y);
  return fmadd(e, V(0.693359375f), f + y);
}
template <typename A>
inline Vectorized<A> fk_select_nonzero(const Vectorized<A>& cond, const Vectorized<A>& value) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), value, cond != Vectorized<A>(A(0)));  // NaN != 0: kept
}
template <typename A>
inline Vectorized<A> fk_select_positive(const Vectorized<A>& cond, const Vectorized<A>& value) {
  return Vectorized<A>::blendv(Vectorized<A>(A(0)), value, cond > Vectorized<A>(A(0)));
}
// expm1 for float vectors: the Taylor series x (1 + x/2 (1 + x/3 (... (1 + x/9)))) for |x| <= 1/2
// (truncation ~1e-8 relative), exp(x) - 1 beyond (no cancellation there); NaN stays NaN. Doubles go lane by
// lane through the library's expm1 (float64 runs are for checking, not speed).
inline Vectorized<float> fk_expm1(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V half(0.5f), one(1.0f);
  const V xs = at::vec::minimum(at::vec::maximum(x, V(-0.5f)), half);
  V p = one;
  for (int k = 9; k >= 2; --k) p = fmadd(xs * V(1.0f / static_cast<float>(k)), p, one);
  return V::blendv(fk_exp(x) - one, xs * p, x.abs() <= half);
}
inline Vectorized<double> fk_expm1(const Vectorized<double>& x) {
  return x.map([](double v) { return std::expm1(v); });
}
template <typename A>
inline Vectorized<A> fk_where_zero(const Vectorized<A>& cond, const Vectorized<A>& if_zero,
                                   const Vectorized<A>& otherwise) {
  return Vectorized<A>::blendv(otherwise, if_zero, cond == Vectorized<A>(A(0)));
}
template <typename A>
inline Vectorized<A> fk_where_nan(const Vectorized<A>& x, const Vectorized<A>& if_nan, const Vectorized<A>& otherwise) {
  return Vectorized<A>::blendv(otherwise, if_nan, x != x);
}
template <typename A>
inline Vectorized<A> fk_where_small(const Vectorized<A>& x, const Vectorized<A>& bound, const Vectorized<A>& if_small,
                                    const Vectorized<A>& otherwise) {
  return Vectorized<A>::blendv(otherwise, if_small, x.abs() <= bound);
}
template <typename A>
inline Vectorized<A> fk_where_finite(const Vectorized<A>& x, const Vectorized<A>& if_finite,
                                     const Vectorized<A>& otherwise) {
  return Vectorized<A>::blendv(otherwise, if_finite, (x - x) == Vectorized<A>(A(0)));
}
}  // namespace CPU_CAPABILITY
}  // namespace at::vec

namespace fastkd {
// fk_splat<Vectorized<A>>(d): a per-call constant broadcast to every lane (divergences.h).
template <typename A>
struct FkScalar<at::vec::Vectorized<A>> {
  using type = A;
};
}  // namespace fastkd

namespace fastkd {
namespace cpu {

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
// as `fill` (-inf: every sweep turns it into "no mass", exp(-inf) = 0), and are not written back.
template <typename Acc, typename X>
inline Vec<Acc> load_tail(const X* ptr, int64_t n, Acc fill = -std::numeric_limits<Acc>::infinity()) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  for (int64_t k = 0; k < Vec<Acc>::size(); ++k) buf[k] = k < n ? static_cast<Acc>(ptr[k]) : fill;
  return Vec<Acc>::loadu(buf);
}

template <typename X, typename Acc>
inline void store_tail(X* ptr, const Vec<Acc>& v, int64_t n) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  for (int64_t k = 0; k < n; ++k) ptr[k] = static_cast<X>(buf[k]);
}

// Stores n (<= Vec size) entries, replacing entry `lane` by f(its value) in the accumulation type, so the
// fixed entry is rounded to X once.
template <typename X, typename Acc, typename F>
inline void store_fixed(X* ptr, const Vec<Acc>& v, int64_t n, int64_t lane, F&& f) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  buf[lane] = f(buf[lane]);
  for (int64_t k = 0; k < n; ++k) ptr[k] = static_cast<X>(buf[k]);
}

// v with lane `lane` replaced by `fill`.
template <typename Acc>
inline Vec<Acc> with_lane(const Vec<Acc>& v, int64_t lane, Acc fill) {
  alignas(64) Acc buf[Vec<Acc>::size()];
  v.store(buf);
  buf[lane] = fill;
  return Vec<Acc>::loadu(buf);
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

// Sums the vectors that body(i) returns for i = begin, begin + W, ... < end (end - begin a multiple of
// W) in blocks: lanes accumulate 64 vectors in Acc, then flush into double, so the rounding error does
// not grow with the vocabulary size. N sums at once: body returns std::array<Vec<Acc>, N>.
template <typename Acc, size_t N, typename Body>
inline std::array<double, N> blocked_sums(int64_t begin, int64_t end, Body&& body) {
  constexpr int64_t W = Vec<Acc>::size();
  constexpr int64_t kBlock = 64 * W;
  std::array<double, N> total{};
  for (int64_t blk = begin; blk < end; blk += kBlock) {
    const int64_t blk_end = std::min(end, blk + kBlock);
    std::array<Vec<Acc>, N> acc;
    acc.fill(Vec<Acc>(Acc(0)));
    for (int64_t i = blk; i < blk_end; i += W) {
      const std::array<Vec<Acc>, N> x = body(i);
      for (size_t k = 0; k < N; ++k) acc[k] += x[k];
    }
    for (size_t k = 0; k < N; ++k) total[k] += lane_sum<Acc>(acc[k]);
  }
  return total;
}

// Gradient buffers are written exactly once into fresh memory, and on Linux the page faults of that first
// touch (4 KiB each) can cost more than the kernel itself. Large buffers are therefore allocated 2 MiB
// aligned and marked MADV_HUGEPAGE (a hint: a no-op where transparent huge pages are disabled).
inline at::Tensor alloc_grad(at::IntArrayRef sizes, const at::TensorOptions& options) {
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

}  // namespace cpu
}  // namespace fastkd
