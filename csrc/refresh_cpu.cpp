// CPU implementation: the shared ATen algorithm (refresh.h); its fallback checks cost nothing here.
#include "eigh.h"
#include "refresh.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(galore_kernels, CPU, m) {
  m.impl("orthonormalize", &galore_kernels::orthonormalize_op);
  m.impl("randomized_basis", &galore_kernels::randomized_basis_op);
  m.impl("batched_eigh", &galore_kernels::batched_eigh_cpu);
}
