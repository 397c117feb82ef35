// The pooling ops' NSC forward kernels (nsc_forward.cuh), every element type and statistic.
#include "cuda/nsc_forward.cuh"

namespace gapkernels {
GAPKERNELS_FOR_EACH_SCALAR_AND_STAT(GAPKERNELS_INSTANTIATE_NSC_FORWARD, AllPositions)
}  // namespace gapkernels
