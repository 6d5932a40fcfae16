// CUDA implementation: every fallback candidate is computed and chosen per batch entry with
// at::where, so deciding between CholeskyQR2, shifted CholeskyQR3 and Householder never reads a
// device value on the host. (at::linalg_eigh still checks its solver's error codes, one
// synchronisation per call, not per matrix.)
#include "refresh.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(galore_kernels, CUDA, m) {
  using galore_kernels::Fallback;
  m.impl("orthonormalize", &galore_kernels::orthonormalize_op<Fallback::kAlways>);
  m.impl("randomized_basis", &galore_kernels::randomized_basis_op<Fallback::kAlways>);
}
