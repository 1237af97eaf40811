// The Python module shell of score_kernels._C. Ops register themselves through
// TORCH_LIBRARY_FRAGMENT(score_ext, ...) in csrc/cpu/*.cpp and csrc/cuda/*_binding.cpp.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "score_kernels compiled ops (registered under torch.ops.score_ext)";
#ifdef SCORE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
