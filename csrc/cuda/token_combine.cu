// Token pooling's combine kernels (combine.cuh), every element type and statistic.
#include "cuda/combine.cuh"

namespace gapkernels {
GAPKERNELS_FOR_EACH_SCALAR_AND_STAT(GAPKERNELS_INSTANTIATE_COMBINE, TokenPositions)
}  // namespace gapkernels
