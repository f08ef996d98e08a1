// Portability macros shared by the CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
// Forced: the CPU kernels instantiate the math with at::vec::Vectorized, and an out-of-line call would pass
// every 32/64-byte vector argument through memory.
#define FASTKD_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FASTKD_HOST_DEVICE inline
#endif
