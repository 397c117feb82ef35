// The ATen side of the shared host code: what csrc/ops.cpp (gapkernels._C, the one library not on
// the LibTorch stable ABI: the schemas, the C++ autograd and the eager entry) takes from it, ATen
// and the modes. The kernel libraries (CPU and CUDA) are on the stable ABI: their host code is
// stable_common.h; the checks they share are checks.h. The modes and the math are in
// pool_math.h; the contract is in docs/DESIGN.md.
#pragma once

#include <ATen/ATen.h>

#include "pool_math.h"
