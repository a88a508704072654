// The dtype tag passed from Tensor code (.cpp) to kernel launchers (.cu), which take raw pointers
// and must not include torch headers (nvcc time). Plain C++: both sides include it.
#pragma once

namespace dots1 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace dots1
