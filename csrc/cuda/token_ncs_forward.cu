// Token pooling's NCS forward kernels (ncs_forward.cuh), every element type and statistic.
#include "cuda/ncs_forward.cuh"

namespace gapkernels {
GAPKERNELS_FOR_EACH_SCALAR_AND_STAT(GAPKERNELS_INSTANTIATE_NCS_FORWARD, TokenPositions)
}  // namespace gapkernels
