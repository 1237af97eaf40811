// Torch-free dtype codes shared by the CUDA launchers and their .cpp bindings.
#pragma once
namespace score {
enum DType : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3 };
}
