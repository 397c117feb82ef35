// Token pooling's NCS backward kernels (ncs_backward.cuh), every element type and formula.
#include "cuda/ncs_backward.cuh"

namespace gapkernels {
GAPKERNELS_FOR_EACH_SCALAR_AND_GRAD(GAPKERNELS_INSTANTIATE_NCS_BACKWARD, TokenPositions)
}  // namespace gapkernels
