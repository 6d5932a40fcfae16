// CPU implementation: the fallbacks run only when some batch entry needs them (a host check is free).
#include "refresh.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(galore_kernels, CPU, m) {
  using galore_kernels::Fallback;
  m.impl("orthonormalize", &galore_kernels::orthonormalize_op<Fallback::kOnDemand>);
  m.impl("randomized_basis", &galore_kernels::randomized_basis_op<Fallback::kOnDemand>);
}
