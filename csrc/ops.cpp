// Schemas of the galore_kernels ops, declared once. Device implementations are registered in
// refresh_cpu.cpp (CPU) and refresh_cuda.cu (CUDA); fake (meta) kernels live on the Python side.
#include <torch/library.h>

TORCH_LIBRARY(galore_kernels, m) {
  // (B, m, k) any float dtype -> (B, m, k) float32 with orthonormal columns.
  m.def("orthonormalize(Tensor Y) -> Tensor");
  // G (B, m, n), omega (B, n, k), 1 <= rank <= k <= min(m, n) -> (B, m, rank) float32.
  m.def("randomized_basis(Tensor G, Tensor omega, int rank, int niter) -> Tensor");
  // C (B, n, n) symmetric, float32/float64 -> eigenvalues (B, n) ascending, eigenvectors (B, n, n) as
  // columns, info (B,) int32 (0: converged).
  m.def("batched_eigh(Tensor C) -> (Tensor eigenvalues, Tensor eigenvectors, Tensor info)");
}
