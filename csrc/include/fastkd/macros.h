// Portability macros shared by the CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTKD_HOST_DEVICE inline
#endif
