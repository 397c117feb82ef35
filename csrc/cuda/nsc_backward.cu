// The pooling ops' NSC backward kernels (nsc_backward.cuh), every element type and formula.
#include "cuda/nsc_backward.cuh"

namespace gapkernels {
GAPKERNELS_FOR_EACH_SCALAR_AND_GRAD(GAPKERNELS_INSTANTIATE_NSC_BACKWARD, AllPositions)
}  // namespace gapkernels
