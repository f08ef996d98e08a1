// Every fastkd operator schema, declared once. Device files only implement them (TORCH_LIBRARY_IMPL).
// The Python module _C exists for introspection (build_info); the operators are reached through
// torch.ops.fastkd.*, which composes with autograd, torch.compile and torch.library.opcheck.
#include <string>

#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

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
  // Hinton KD, fused forward: per-row loss terms and (when asked) the gradients of the *reduced* loss
  // with respect to student and teacher, computed in the same pass over the logits.
  //   student, teacher: [rows, vocab]; labels: [rows] integer or None; reduction: batchmean|sum|mean|none.
  // Returns (loss, grad_student, grad_teacher); a gradient not asked for is an empty tensor.
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? labels, float temperature, int ignore_index, "
      "str reduction, bool scale_by_temperature, bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor)");
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
}
