// CUDA implementation of fastkd::dist_forward (DIST, dist_math.h). Written to be right by construction rather
// than fast: every reduction is a CUB block reduction or a loop in a fixed order (no floating-point atomics: the
// result is the same bits run to run), sums in float64, int64 indexing.
//   1. dist_row_stats   one block per row: maxima, Z, the row's sums sab, saa, sbb;
//   2. dist_shift       one thread per column: row 0's softmax entries, the columns' shifts (dist_math.h);
//      dist_col_partial (column tiles) x (K = min(16, N) row blocks): each thread one column, the float64 sums
//                       ca, cb, caa, cbb, cab over its row block, into partial[K, 5, C];
//   3. dist_col_finish  one thread per column: the K partials in block order, the column's coefficients;
//   4. dist_loss_rows   one block: the rows' coefficients, sum rho, sum kappa, the loss;
//   5. dist_grad        one block per row (gradients asked for): sum_k y_k G_k, then the gradient row.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "fastkd/dist_host.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kDistBlocks = 16;

__device__ __forceinline__ float dist_exp(float x) { return expf(x); }
__device__ __forceinline__ double dist_exp(double x) { return exp(x); }

struct NanMax {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return kd_nan_max(a, b);
  }
};

struct Add {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};

// Reduces each of v[0..K) over the block with op (CUB's fixed tree: the same bits every run); every thread gets
// the K results. Ends with a barrier: the caller may reduce again at once.
template <typename X, int K, typename Op>
__device__ __forceinline__ void block_reduce(X (&v)[K], Op op) {
  using Reduce = cub::BlockReduce<X, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ X out[K];
  for (int k = 0; k < K; ++k) {
    const X r = Reduce(tmp).Reduce(v[k], op);
    if (threadIdx.x == 0) out[k] = r;
    __syncthreads();
  }
  for (int k = 0; k < K; ++k) v[k] = out[k];
  __syncthreads();
}

// Row r of the student or teacher logits.
template <typename X>
__device__ __forceinline__ const X* logits_row(const void* base, int64_t row_stride, int64_t r) {
  return static_cast<const X*>(base) + r * row_stride;
}

// Scratch of one call: per row (max_s, max_t, inv_zs, inv_zt, ru, rv, rw as Acc; sab, saa, sbb as double), per
// column (ma, mb, cu, cv, cw as Acc; kappa as double), the partial column sums.
template <typename Acc>
struct DistScratch {
  Acc *max_s, *max_t, *inv_zs, *inv_zt, *ru, *rv, *rw;
  double *sab, *saa, *sbb;
  Acc *ma, *mb, *cu, *cv, *cw, *sh_s, *sh_t;  // ma, mb: the column means of ys, yt; sh: the shifts
  double* kappa;
  double* partial;  // [K, 5, C]
  int64_t blocks;   // K
  double* loss;     // [1]
};

// Entry j of row r's softmax, as every kernel computes it.
template <typename S, typename Acc>
__device__ __forceinline__ Acc prob_entry(const S* row, int64_t j, Acc max, Acc inv_t, Acc inv_z) {
  return dist_exp(kd_shift(static_cast<Acc>(row[j]), max, inv_t)) * inv_z;
}

template <typename S, typename T, typename Acc>
__global__ void dist_row_stats(DistParams p, DistScratch<Acc> w) {
  const int64_t r = blockIdx.x, C = p.cols;
  const S* s = logits_row<S>(p.student, p.student_row_stride, r);
  const T* t = logits_row<T>(p.teacher, p.teacher_row_stride, r);
  const Acc inv_t = static_cast<Acc>(p.inv_tau), inv_c = static_cast<Acc>(1.0 / static_cast<double>(C));

  Acc max[2] = {-static_cast<Acc>(INFINITY), -static_cast<Acc>(INFINITY)};  // student, teacher
  for (int64_t j = threadIdx.x; j < C; j += kBlock) {
    max[0] = kd_nan_max(max[0], static_cast<Acc>(s[j]));
    max[1] = kd_nan_max(max[1], static_cast<Acc>(t[j]));
  }
  block_reduce(max, NanMax{});
  const Acc max_s = max[0], max_t = max[1];

  double z[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < C; j += kBlock) {
    z[0] += static_cast<double>(dist_exp(kd_shift(static_cast<Acc>(s[j]), max_s, inv_t)));
    z[1] += static_cast<double>(dist_exp(kd_shift(static_cast<Acc>(t[j]), max_t, inv_t)));
  }
  block_reduce(z, Add{});
  const Acc inv_zs = static_cast<Acc>(1.0 / z[0]), inv_zt = static_cast<Acc>(1.0 / z[1]);

  double sums[3] = {0.0, 0.0, 0.0};  // sab, saa, sbb
  for (int64_t j = threadIdx.x; j < C; j += kBlock) {
    const double a = dist_centered(prob_entry(s, j, max_s, inv_t, inv_zs), Acc(1), inv_c);
    const double b = dist_centered(prob_entry(t, j, max_t, inv_t, inv_zt), Acc(1), inv_c);
    sums[0] += a * b;
    sums[1] += a * a;
    sums[2] += b * b;
  }
  block_reduce(sums, Add{});
  if (threadIdx.x == 0) {
    w.max_s[r] = max_s;
    w.max_t[r] = max_t;
    w.inv_zs[r] = inv_zs;
    w.inv_zt[r] = inv_zt;
    w.sab[r] = sums[0];
    w.saa[r] = sums[1];
    w.sbb[r] = sums[2];
  }
}

// The column shifts: row 0's softmax entries (dist_math.h).
template <typename S, typename T, typename Acc>
__global__ void dist_shift(DistParams p, DistScratch<Acc> w) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (j >= p.cols) return;
  const Acc inv_t = static_cast<Acc>(p.inv_tau);
  w.sh_s[j] = prob_entry(logits_row<S>(p.student, p.student_row_stride, 0), j, w.max_s[0], inv_t, w.inv_zs[0]);
  w.sh_t[j] = prob_entry(logits_row<T>(p.teacher, p.teacher_row_stride, 0), j, w.max_t[0], inv_t, w.inv_zt[0]);
}

template <typename S, typename T, typename Acc>
__global__ void dist_col_partial(DistParams p, DistScratch<Acc> w) {
  const int64_t C = p.cols, N = p.rows, K = w.blocks;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  const int64_t k = blockIdx.y;
  if (j >= C) return;
  const Acc inv_t = static_cast<Acc>(p.inv_tau);
  const double sh_s = w.sh_s[j], sh_t = w.sh_t[j];
  double ca = 0.0, cb = 0.0, caa = 0.0, cbb = 0.0, cab = 0.0;
  for (int64_t r = k * N / K; r < (k + 1) * N / K; ++r) {
    const S* s = logits_row<S>(p.student, p.student_row_stride, r);
    const T* t = logits_row<T>(p.teacher, p.teacher_row_stride, r);
    const double a = static_cast<double>(prob_entry(s, j, w.max_s[r], inv_t, w.inv_zs[r])) - sh_s;
    const double b = static_cast<double>(prob_entry(t, j, w.max_t[r], inv_t, w.inv_zt[r])) - sh_t;
    ca += a;
    cb += b;
    caa += a * a;
    cbb += b * b;
    cab += a * b;
  }
  double* out = w.partial + k * 5 * C + j;
  out[0] = ca;
  out[C] = cb;
  out[2 * C] = caa;
  out[3 * C] = cbb;
  out[4 * C] = cab;
}

template <typename Acc>
__global__ void dist_col_finish(DistParams p, DistScratch<Acc> w) {
  const int64_t C = p.cols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x;
  if (j >= C) return;
  double sum[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t k = 0; k < w.blocks; ++k) {
    for (int q = 0; q < 5; ++q) sum[q] += w.partial[(k * 5 + q) * C + j];
  }
  const DistColumn col = dist_column(sum[0], sum[1], sum[2], sum[3], sum[4], w.sh_s[j], w.sh_t[j], p.rows);
  const DistCos cs = dist_cos(col.sab, col.saa, col.sbb, p.eps);
  const double scale = dist_col_scale(p);
  w.kappa[j] = cs.cos;
  w.ma[j] = static_cast<Acc>(col.mean_s);
  w.mb[j] = static_cast<Acc>(col.mean_t);
  w.cu[j] = static_cast<Acc>(scale * cs.u);
  w.cv[j] = static_cast<Acc>(scale * cs.v);
  w.cw[j] = static_cast<Acc>(scale * cs.w);
}

template <typename Acc>
__global__ void dist_loss_rows(DistParams p, DistScratch<Acc> w) {
  const double scale = dist_row_scale(p);
  double sums[2] = {0.0, 0.0};  // rho, kappa
  for (int64_t r = threadIdx.x; r < p.rows; r += kBlock) {
    const DistCos cs = dist_cos(w.sab[r], w.saa[r], w.sbb[r], p.eps);
    sums[0] += cs.cos;
    w.ru[r] = static_cast<Acc>(scale * cs.u);
    w.rv[r] = static_cast<Acc>(scale * cs.v);
    w.rw[r] = static_cast<Acc>(scale * cs.w);
  }
  for (int64_t j = threadIdx.x; j < p.cols; j += kBlock) sums[1] += w.kappa[j];
  block_reduce(sums, Add{});
  if (threadIdx.x == 0) w.loss[0] = dist_loss_value(p, sums[0], sums[1]);
}

template <typename S, typename T, typename Acc>
__global__ void dist_grad(DistParams p, DistScratch<Acc> w) {
  const int64_t r = blockIdx.x, C = p.cols;
  const S* s = logits_row<S>(p.student, p.student_row_stride, r);
  const T* t = logits_row<T>(p.teacher, p.teacher_row_stride, r);
  Acc* gs = p.grad_student ? static_cast<Acc*>(p.grad_student) + r * C : nullptr;
  Acc* gt = p.grad_teacher ? static_cast<Acc*>(p.grad_teacher) + r * C : nullptr;
  const Acc inv_t = static_cast<Acc>(p.inv_tau), inv_c = static_cast<Acc>(1.0 / static_cast<double>(C));
  const Acc max_s = w.max_s[r], max_t = w.max_t[r], inv_zs = w.inv_zs[r], inv_zt = w.inv_zt[r];
  const Acc ru = w.ru[r], rv = w.rv[r], rw = w.rw[r];
  const Acc neg_tau = static_cast<Acc>(-p.tau);

  // G of both sides at entry j (only the ones asked for are used)
  auto entry = [&](int64_t j, Acc& ys, Acc& yt, Acc& g_s, Acc& g_t) {
    ys = prob_entry(s, j, max_s, inv_t, inv_zs);
    yt = prob_entry(t, j, max_t, inv_t, inv_zt);
    const Acc a = dist_centered(ys, Acc(1), inv_c), b = dist_centered(yt, Acc(1), inv_c);
    const Acc alpha = ys - w.ma[j], beta = yt - w.mb[j];
    g_s = dist_student_g(a, b, alpha, beta, ru, rv, w.cu[j], w.cv[j]);
    g_t = dist_teacher_g(a, b, alpha, beta, ru, rw, w.cu[j], w.cw[j]);
  };
  double sums[2] = {0.0, 0.0};  // sum_k y_k G_k of the student, the teacher
  for (int64_t j = threadIdx.x; j < C; j += kBlock) {
    Acc ys, yt, g_s, g_t;
    entry(j, ys, yt, g_s, g_t);
    sums[0] += static_cast<double>(ys * g_s);
    sums[1] += static_cast<double>(yt * g_t);
  }
  block_reduce(sums, Add{});
  const Acc sum_s = static_cast<Acc>(sums[0]), sum_t = static_cast<Acc>(sums[1]);
  for (int64_t j = threadIdx.x; j < C; j += kBlock) {
    Acc ys, yt, g_s, g_t;
    entry(j, ys, yt, g_s, g_t);
    if (gs) gs[j] = neg_tau * (ys * g_s - ys * sum_s);
    if (gt) gt[j] = neg_tau * (yt * g_t - yt * sum_t);
  }
}

template <typename S, typename T>
double* launch_dist(const DistParams& p, const at::TensorOptions& device, std::vector<at::Tensor>& keep) {
  using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
  const int64_t N = p.rows, C = p.cols, K = std::min<int64_t>(kDistBlocks, N);
  const auto acc_type = std::is_same_v<Acc, double> ? at::kDouble : at::kFloat;
  at::Tensor acc_buf = at::empty({7 * N + 7 * C}, device.dtype(acc_type));
  at::Tensor dbl_buf = at::empty({3 * N + C + K * 5 * C + 1}, device.dtype(at::kDouble));
  keep.push_back(acc_buf);
  keep.push_back(dbl_buf);
  Acc* a = acc_buf.data_ptr<Acc>();
  double* d = dbl_buf.data_ptr<double>();
  DistScratch<Acc> w;
  w.max_s = a;
  w.max_t = a + N;
  w.inv_zs = a + 2 * N;
  w.inv_zt = a + 3 * N;
  w.ru = a + 4 * N;
  w.rv = a + 5 * N;
  w.rw = a + 6 * N;
  w.ma = a + 7 * N;
  w.mb = w.ma + C;
  w.cu = w.mb + C;
  w.cv = w.cu + C;
  w.cw = w.cv + C;
  w.sh_s = w.cw + C;
  w.sh_t = w.sh_s + C;
  w.sab = d;
  w.saa = d + N;
  w.sbb = d + 2 * N;
  w.kappa = d + 3 * N;
  w.partial = w.kappa + C;
  w.blocks = K;
  w.loss = w.partial + K * 5 * C;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t col_tiles = (C + kBlock - 1) / kBlock;
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max() && col_tiles <= std::numeric_limits<int32_t>::max(),
              "fastkd: dist_loss: too many rows or classes for one launch (", N, " x ", C, ")");
  dist_row_stats<S, T, Acc><<<static_cast<unsigned>(N), kBlock, 0, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dist_shift<S, T, Acc><<<static_cast<unsigned>(col_tiles), kBlock, 0, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dist_col_partial<S, T, Acc><<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(K)), kBlock, 0, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dist_col_finish<Acc><<<static_cast<unsigned>(col_tiles), kBlock, 0, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dist_loss_rows<Acc><<<1, kBlock, 0, stream>>>(p, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.grad_student || p.grad_teacher) {
    dist_grad<S, T, Acc><<<static_cast<unsigned>(N), kBlock, 0, stream>>>(p, w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return w.loss;
}

at::Tensor alloc_grad_cuda(at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                 double beta, double gamma, double tau, double eps,
                                                                 bool grad_student, bool grad_teacher) {
  const c10::cuda::CUDAGuard guard(student.device());
  DistCall c = dist_prepare(student, teacher, beta, gamma, tau, eps, grad_student, grad_teacher, alloc_grad_cuda);
  if (!dist_has_work(c)) return dist_outputs(c, at::Tensor());
  std::vector<at::Tensor> keep;
  at::Tensor loss64;
  kd_dispatch_pair(c.student.scalar_type(), c.teacher.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using T = decltype(t_tag);
    launch_dist<S, T>(c.p, c.student.options(), keep);
    // the loss is the last float64 of the scratch buffer
    loss64 = keep[1].narrow(0, keep[1].numel() - 1, 1).reshape({});
  });
  return dist_outputs(c, loss64);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl(DistOp::name, &cuda::dist_forward_cuda); }

}  // namespace fastkd
