// CUDA implementation: the shared ATen algorithm (refresh.h) on the current stream, with the
// orthonormalisation fallbacks computed on demand. Deciding whether any batch entry needs a fallback
// reads one device flag on the host per fallback level and call: a handful of synchronisations per
// batched refresh (at::linalg_eigh checks its solver's error codes with one as well), never one per
// matrix (computing every fallback for every entry instead would avoid those synchronisations but
// run a Householder QR per power iteration: several milliseconds each at the anchor shapes).
// The small eigenproblems go to cuSOLVER's batched solver (eigh_cuda.cu).
#include "eigh.h"
#include "refresh.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(galore_kernels, CUDA, m) {
  m.impl("orthonormalize", &galore_kernels::orthonormalize_op);
  m.impl("randomized_basis", &galore_kernels::randomized_basis_op);
  m.impl("batched_eigh", &galore_kernels::batched_eigh_cuda);
}
