// The response divergences, listed once. Each is a trait struct: its schema name, its family, its named
// parameters (registry order, ranges, defaults) and its FASTKD_HOST_DEVICE math. From the list
// FASTKD_DIVERGENCES come the Divergence enum, the name parser, the dispatcher and the explicit
// instantiations of every CPU ISA library and the CUDA library; fastkd/divergences.py holds the matching
// Python specs (a test checks that the two agree).
//
// Families (p = teacher, q = student, both softmax(z / T) of one row):
//   KLType     KL(p || q), or KL(q || p) with kSwap: the row's value comes from the sums Z_s, Z_t and
//              sum e (a - b) of the statistics sweep; no per-entry sweep is needed.
//   Psi        L = sum_j phi(p_j, q_j): a per-entry sweep gathers sum phi, sum psi_p, sum psi_q
//              (psi_p = p dphi/dp, psi_q = q dphi/dq; any multiple of p (of q) may be added to psi_p (psi_q):
//              it cancels in the gradient), and the gradients are psi - w * sum psi (kd_math.h psi_grad).
//   Decoupled  DKD: the target class is split off (dkd_row in kd_math.h).
//
// Adding a divergence: a trait struct below (name, family, params, coefficients, terms) and one line in
// FASTKD_DIVERGENCES; its Python spec in fastkd/divergences.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fastkd/kd_math.h"

namespace fastkd {

enum class Family : int32_t { KLType = 0, Psi = 1, Decoupled = 2 };

// A named hyperparameter of a divergence: its default and its range [lo, hi] (an end is excluded when
// marked open). Host-side data: read by the validation, never by a kernel.
struct ParamSpec {
  const char* name;
  double default_value;
  double lo, hi;
  bool lo_open, hi_open;
};

constexpr int kMaxDivParams = 4;  // parameters of one divergence
constexpr int kMaxDivCoef = 10;   // derived per-call constants of one divergence

// What a kernel sees of a divergence's parameters: the raw values in registry order, and the constants
// its terms use, derived once per call (Trait::coefficients).
struct DivArgs {
  double param[kMaxDivParams] = {0, 0, 0, 0};
  double coef[kMaxDivCoef] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
};

// A per-call constant as the value type X of the math (float, double or a CPU vector of them).
template <typename X>
struct FkScalar {
  using type = X;
};
template <typename X>
FASTKD_HOST_DEVICE X fk_splat(double d) {
  return X(static_cast<typename FkScalar<X>::type>(d));
}

// ---- the traits ----

// What a trait does not declare: no parameters, no derived constants, no swap of the two sides, no alias.
struct DivergenceDefaults {
  static constexpr bool kSwap = false;
  static constexpr int kNumParams = 0;
  static constexpr ParamSpec kParams[1] = {{"", 0, 0, 0, false, false}};
  FASTKD_HOST_DEVICE static void coefficients(DivArgs&) {}
  // The parameter-free divergence this one equals for these parameters (run by its kernels: exact there and
  // cheaper), or nullptr. Host-side.
  static const char* alias(const DivArgs&) { return nullptr; }
};

// Hinton KD: KL(p || q). Its per-entry terms (phi = p log(p/q), psi_p = phi, psi_q = -p) serve the phases of
// a vocabulary range (shard_host.h); the single-range kernels take the value from the statistics sweep.
struct KlDivergence : DivergenceDefaults {
  static constexpr const char* kName = "kl";
  static constexpr Family kFamily = Family::KLType;
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X p, X, const DivArgs&, X& psi_p, X& psi_q, X& phi) {
    phi = fk_select_nonzero(p, p * (log_p - log_q));
    psi_p = phi;
    psi_q = X(0.0f) - p;
  }
};

struct ReverseKlDivergence : DivergenceDefaults {  // KL(q || p): KL with the roles of the two sides swapped
  static constexpr const char* kName = "reverse_kl";
  static constexpr Family kFamily = Family::KLType;
  static constexpr bool kSwap = true;
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X p, X q, const DivArgs& a, X& psi_p, X& psi_q, X& phi) {
    KlDivergence::terms(log_q, log_p, q, p, a, psi_q, psi_p, phi);
  }
};

// Generalized JSD(beta), m = beta p + (1 - beta) q:
//   phi = beta p log(p/m) + (1 - beta) q log(q/m),  psi_p = beta p log(p/m),  psi_q = (1 - beta) q log(q/m)
// (so phi = psi_p + psi_q). Each weighted term is dropped where its weight is 0, and a positive weight w
// implies m >= w > 0: entries that underflow (or are -inf) on both sides give 0, never 0 * inf. Beta 0 and
// 1 are KL(p || q) and KL(q || p) in TRL's convention (not the limits of the formula, which are 0).
struct JsdDivergence : DivergenceDefaults {
  static constexpr const char* kName = "jsd";
  static constexpr Family kFamily = Family::Psi;
  static constexpr int kNumParams = 1;
  static constexpr ParamSpec kParams[1] = {{"beta", 0.5, 0.0, 1.0, false, false}};
  static const char* alias(const DivArgs& a) {
    return a.param[0] == 0.0 ? "kl" : a.param[0] == 1.0 ? "reverse_kl" : nullptr;
  }
  FASTKD_HOST_DEVICE static void coefficients(DivArgs& a) {
    a.coef[0] = a.param[0];
    a.coef[1] = 1.0 - a.param[0];
  }
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X p, X q, const DivArgs& a, X& psi_p, X& psi_q, X& phi) {
    const X wp = fk_splat<X>(a.coef[0]) * p;
    const X wq = fk_splat<X>(a.coef[1]) * q;
    const X log_m = fk_log_prob(wp + wq);
    psi_p = fk_select_nonzero(wp, wp * (log_p - log_m));
    psi_q = fk_select_nonzero(wq, wq * (log_q - log_m));
    phi = psi_p + psi_q;
  }
};

// Total variation, phi = |p - q| / 2 with the subgradient sign(0) = 0 at ties:
//   psi_p = p sign(p - q) / 2,  psi_q = -q sign(p - q) / 2,  phi = (p - q) sign(p - q) / 2.
struct TvdDivergence : DivergenceDefaults {
  static constexpr const char* kName = "tvd";
  static constexpr Family kFamily = Family::Psi;
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X, X, X p, X q, const DivArgs&, X& psi_p, X& psi_q, X& phi) {
    const X half_sign = fk_select_positive(p - q, X(0.5f)) - fk_select_positive(q - p, X(0.5f));
    psi_p = p * half_sign;
    psi_q = X(0.0f) - q * half_sign;
    phi = (p - q) * half_sign;
  }
};

// Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD (dkd_row in kd_math.h; its row dots, for the
// temperature's and the standardization's gradients: dkd_row_dots in row_options.h).
struct DkdDivergence : DivergenceDefaults {
  static constexpr const char* kName = "dkd";
  static constexpr Family kFamily = Family::Decoupled;
  static constexpr int kNumParams = 2;
  static constexpr ParamSpec kParams[2] = {{"alpha", 1.0, 0.0, INFINITY, false, true},
                                          {"beta", 8.0, 0.0, INFINITY, false, true}};
};

// Skew KL (DistiLLM, ICML 2024): KL(p || m), m = a p + (1 - a) q, a = skew in [0, 1):
//   phi = p log(p/m),  psi_p = p log(p/m) - a p^2 / m,  psi_q = -(1 - a) p q / m
// (psi_p without its multiple p of p). Where p is 0 every term is 0; a > 0 keeps m >= a p > 0 wherever p > 0.
// skew 0 is KL(p || q), run by its kernels.
struct SkewKlDivergence : DivergenceDefaults {
  static constexpr const char* kName = "skew_kl";
  static constexpr Family kFamily = Family::Psi;
  static constexpr int kNumParams = 1;
  static constexpr ParamSpec kParams[1] = {{"skew", 0.1, 0.0, 1.0, false, true}};
  static const char* alias(const DivArgs& a) { return a.param[0] == 0.0 ? "kl" : nullptr; }
  FASTKD_HOST_DEVICE static void coefficients(DivArgs& a) {
    a.coef[0] = a.param[0];
    a.coef[1] = 1.0 - a.param[0];
  }
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X, X p, X q, const DivArgs& a, X& psi_p, X& psi_q, X& phi) {
    const X wp = fk_splat<X>(a.coef[0]) * p, wq = fk_splat<X>(a.coef[1]) * q;
    const X m = wp + wq;
    const X r = p / m;
    phi = fk_select_nonzero(p, p * (log_p - fk_log_prob(m)));
    psi_p = fk_select_nonzero(p, phi - wp * r);
    psi_q = fk_select_nonzero(p, X(0.0f) - wq * r);
  }
};

// Skew reverse KL (DistiLLM): KL(q || m), m = a q + (1 - a) p, a = skew in [0, 1): the skew KL with the roles
// of the two sides swapped,
//   phi = q log(q/m),  psi_q = q log(q/m) - a q^2 / m,  psi_p = -(1 - a) p q / m.
// skew 0 is KL(q || p), run by its kernels.
struct SkewReverseKlDivergence : DivergenceDefaults {
  static constexpr const char* kName = "skew_reverse_kl";
  static constexpr Family kFamily = Family::Psi;
  static constexpr int kNumParams = 1;
  static constexpr ParamSpec kParams[1] = {{"skew", 0.1, 0.0, 1.0, false, true}};
  static const char* alias(const DivArgs& a) { return a.param[0] == 0.0 ? "reverse_kl" : nullptr; }
  FASTKD_HOST_DEVICE static void coefficients(DivArgs& a) { SkewKlDivergence::coefficients(a); }
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X p, X q, const DivArgs& a, X& psi_p, X& psi_q, X& phi) {
    SkewKlDivergence::terms(log_q, log_p, q, p, a, psi_q, psi_p, phi);
  }
};

// Symmetric KL (torchtune SymmetricKL, DistiLLM symmetric_kl): (1 - w) KL(p || q) + w KL(q || p),
// w = reverse_weight in [0, 1]:
//   phi = (1 - w) p log(p/q) + w q log(q/p),  psi_p = (1 - w) p log(p/q) - w q,  psi_q = w q log(q/p) - (1 - w) p
// (each psi without its multiple of p, resp. q). w 0 and 1 are the forward and reverse KL, run by their kernels.
struct SymmetricKlDivergence : DivergenceDefaults {
  static constexpr const char* kName = "symmetric_kl";
  static constexpr Family kFamily = Family::Psi;
  static constexpr int kNumParams = 1;
  static constexpr ParamSpec kParams[1] = {{"reverse_weight", 0.5, 0.0, 1.0, false, false}};
  static const char* alias(const DivArgs& a) {
    return a.param[0] == 0.0 ? "kl" : a.param[0] == 1.0 ? "reverse_kl" : nullptr;
  }
  FASTKD_HOST_DEVICE static void coefficients(DivArgs& a) {
    a.coef[0] = 1.0 - a.param[0];
    a.coef[1] = a.param[0];
  }
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X p, X q, const DivArgs& a, X& psi_p, X& psi_q, X& phi) {
    const X wf = fk_splat<X>(a.coef[0]), wr = fk_splat<X>(a.coef[1]);
    const X forward = fk_select_nonzero(p, p * (log_p - log_q)), reverse = fk_select_nonzero(q, q * (log_q - log_p));
    phi = wf * forward + wr * reverse;
    psi_p = wf * forward - wr * q;
    psi_q = wr * reverse - wf * p;
  }
};

// Alpha-beta divergence (ABKD, ICML 2025), a = alpha, b = beta: -sum (p^a q^b - a/(a+b) p^(a+b) -
// b/(a+b) q^(a+b)) / (a b) and its limits, everything from log p and log q (p and q may underflow while the
// terms do not). Where both are positive, with d = log p - log q and w = p^a q^b: psi_p = (p^(a+b) - w) / b,
// psi_q = (q^(a+b) - w) / a, as w expm1(b d) / b and w expm1(-a d) / a where |b d|, |a d| <= 1 (no cancellation;
// w d at b = 0, -w d at a = 0); phi = (psi_p + psi_q) / (a + b), or (expm1(a d) - a d) / a^2 at a + b = 0
// (d^2 / 2 at a = b = 0). Where p = 0 < q: phi = q^(a+b) / (a (a+b)), psi_q = q^(a+b) / a if a, a + b > 0, else
// +inf (q = 0 < p likewise); p = q = 0 gives 0. (1, 0) and (0, 1) are the two KLs.
struct AbDivergence : DivergenceDefaults {
  static constexpr const char* kName = "ab";
  static constexpr Family kFamily = Family::Psi;
  static constexpr int kNumParams = 2;
  static constexpr ParamSpec kParams[2] = {{"alpha", NAN, -INFINITY, INFINITY, false, false},
                                           {"beta", NAN, -INFINITY, INFINITY, false, false}};
  static const char* alias(const DivArgs& c) {
    if (c.param[0] == 1.0 && c.param[1] == 0.0) return "kl";
    return c.param[0] == 0.0 && c.param[1] == 1.0 ? "reverse_kl" : nullptr;
  }
  // (x^(a+b) - w) / c for the exponent c (b for psi_p with x = p, a for psi_q with x = q), cd = c * (log x - log y)
  template <typename X>
  FASTKD_HOST_DEVICE static X psi(double c, double s, X log_x, X w, X diff) {
    if (c == 0.0) return w * diff;
    const X cd = fk_splat<X>(c) * diff, inv_c = fk_splat<X>(1.0 / c);
    return fk_where_small(cd, X(1.0f), w * fk_expm1(cd) * inv_c, (fk_exp(fk_splat<X>(s) * log_x) - w) * inv_c);
  }
  template <typename X>
  FASTKD_HOST_DEVICE static void terms(X log_p, X log_q, X, X, const DivArgs& c, X& psi_p, X& psi_q, X& phi) {
    const double a = c.param[0], b = c.param[1], s = a + b, inf = INFINITY;
    const X d = log_p - log_q, zero(0.0f), nan(NAN);
    const X w = fk_exp(fk_splat<X>(a) * log_p + fk_splat<X>(b) * log_q);
    const X pp = psi(b, s, log_p, w, d), pq = psi(a, s, log_q, w, zero - d), ad = fk_splat<X>(a) * d;
    const X q_s = fk_exp(fk_splat<X>(s) * log_q), p_s = fk_exp(fk_splat<X>(s) * log_p);
    X ph;
    if (s == 0.0) {
      ph = a != 0.0 ? (fk_expm1(ad) - ad) * fk_splat<X>(1.0 / (a * a)) : d * d * X(0.5f);
    } else {  // where psi_p + psi_q overflows (inf - inf), the definition's own sum: no cancellation there
      const X direct = a == 0.0   ? (w * (zero - fk_splat<X>(b) * d - X(1.0f)) + p_s) * fk_splat<X>(1.0 / (b * b))
                       : b == 0.0 ? (w * (ad - X(1.0f)) + q_s) * fk_splat<X>(1.0 / (a * a))
                                  : (w - fk_splat<X>(a / s) * p_s - fk_splat<X>(b / s) * q_s) * fk_splat<X>(-1.0 / (a * b));
      ph = fk_where_finite(pp + pq, (pp + pq) * fk_splat<X>(1.0 / s), direct);
    }
    // exactly one side 0 (d = +-inf): the other side's power; both 0 (d NaN, log p + log q = -inf): 0; NaN: NaN
    const bool p0 = a > 0.0 && s > 0.0, q0 = b > 0.0 && s > 0.0;  // finite with p = 0 (with q = 0)
    const X none = fk_where_zero(fk_exp(log_p + log_q), zero, nan);
    auto pick = [&](X general, X if_q_zero, X if_p_zero) {
      return fk_where_finite(d, general, fk_where_nan(d, none, fk_where_finite(log_p, if_q_zero, if_p_zero)));
    };
    phi = pick(ph, p_s * fk_splat<X>(q0 ? 1.0 / (b * s) : inf), q_s * fk_splat<X>(p0 ? 1.0 / (a * s) : inf));
    psi_p = pick(pp, p_s * fk_splat<X>(q0 ? 1.0 / b : inf), zero);
    psi_q = pick(pq, zero, q_s * fk_splat<X>(p0 ? 1.0 / a : inf));
  }
};

// ---- the list ----
// X(enum entry, trait struct, family token). The family token lets a translation unit instantiate the
// kernels of one family only (kd_cpu.cpp / kd_cpu_psi.cpp compile in parallel).
// (Continuation backslashes unaligned on purpose: a new entry is one added line.)
#define FASTKD_DIVERGENCES(X) \
  X(KL, KlDivergence, kl_type) \
  X(ReverseKL, ReverseKlDivergence, kl_type) \
  X(JSD, JsdDivergence, psi) \
  X(TVD, TvdDivergence, psi) \
  X(DKD, DkdDivergence, decoupled) \
  X(SkewKL, SkewKlDivergence, psi) \
  X(SkewReverseKL, SkewReverseKlDivergence, psi) \
  X(SymmetricKL, SymmetricKlDivergence, psi) \
  X(AB, AbDivergence, psi) \
  /* new entries above this line */

#define FASTKD_DIV_ENUM(id, trait, family) id,
enum class Divergence : int32_t { FASTKD_DIVERGENCES(FASTKD_DIV_ENUM) };
#undef FASTKD_DIV_ENUM

template <Divergence D>
struct DivergenceTraitOf;
#define FASTKD_DIV_TRAIT(id, trait, family) \
  template <>                               \
  struct DivergenceTraitOf<Divergence::id> { using type = trait; };
FASTKD_DIVERGENCES(FASTKD_DIV_TRAIT)
#undef FASTKD_DIV_TRAIT
template <Divergence D>
using DivergenceTrait = typename DivergenceTraitOf<D>::type;

// Calls f(std::integral_constant<Divergence, D>{}) for the runtime divergence d (host code: the kernels are
// instantiated per divergence).
template <typename F>
inline void dispatch_divergence(Divergence d, F&& f) {
#define FASTKD_DIV_CASE(id, trait, family) \
  case Divergence::id:                     \
    f(std::integral_constant<Divergence, Divergence::id>{}); \
    break;
  switch (d) { FASTKD_DIVERGENCES(FASTKD_DIV_CASE) }
#undef FASTKD_DIV_CASE
}

// Derives a call's per-divergence constants from its parameters.
inline void divergence_coefficients(Divergence d, DivArgs& a) {
  dispatch_divergence(d, [&](auto tag) { DivergenceTrait<decltype(tag)::value>::coefficients(a); });
}

// ---- per-row finishing math shared by the CPU and CUDA kernels ----

// Scalars of a KL-type (or decoupled) row's gradients: student c_q * q - c_p * p, teacher
// p * (c_t * (log p - log q) - k_t) (kd_math.h kd_grad_student2 / kd_grad_teacher2; for kSwap the two
// roles swap), and DKD's target entries.
struct KlGradScalars {
  double c_q, c_p, c_t, k_t;
  double student_target, teacher_target;  // DKD only
};

FASTKD_HOST_DEVICE KlGradScalars kl_grad_scalars(double coef, double divergence) {
  return {coef, coef, coef, coef * divergence, 0.0, 0.0};
}

// DKD with alpha * TCKD + beta * NCKD: the non-target entries follow the NCKD softmaxes plus TCKD's share of
// the non-target mass; the target entries carry TCKD's binary gradient.
FASTKD_HOST_DEVICE KlGradScalars dkd_grad_scalars(const DkdRow& r, double alpha, double beta, double coef) {
  KlGradScalars g;
  g.c_q = coef * (beta + alpha * (r.p_y - r.q_y));
  g.c_p = g.c_t = coef * beta;
  g.k_t = coef * (beta * r.nckd + alpha * r.h);
  g.student_target = coef * alpha * (r.q_y - r.p_y);
  g.teacher_target = coef * alpha * r.h;
  return g;
}

}  // namespace fastkd
