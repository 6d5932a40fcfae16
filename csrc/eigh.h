// galore_kernels::batched_eigh: eigenvalues (ascending) and eigenvectors of a batch of symmetric
// matrices, plus a per-matrix status (0 = converged), for the refresh's small k x k problems.
//
// CPU: at::linalg_eigh (LAPACK), so the native refresh stays bit for bit the PyTorch reference.
// CUDA (eigh_cuda.cu): one cuSOLVER call for the whole batch. torch.linalg.eigh solves a batch of
// matrices larger than 32 x 32 one after another; a model's refresh is hundreds of them.
//
// C++17: the GPU machines build with torch 2.11.
#pragma once

#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace galore_kernels {

using EighResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (B, n), (B, n, n), (B,) int32

inline void check_batched_eigh_inputs(const at::Tensor& C) {
  TORCH_CHECK(C.dim() == 3 && C.size(1) == C.size(2),
              "galore_kernels::batched_eigh: C must be a batch of square matrices (B, n, n), got shape ",
              C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kDouble,
              "galore_kernels::batched_eigh: C must be float32 or float64, got ", C.scalar_type());
}

// at::linalg_eigh with a zero status per matrix (it raises itself when LAPACK fails).
inline EighResult batched_eigh_torch(const at::Tensor& C) {
  at::Tensor values, vectors;
  std::tie(values, vectors) = at::linalg_eigh(C);
  return std::make_tuple(values, vectors, at::zeros({C.size(0)}, C.options().dtype(at::kInt)));
}

inline EighResult batched_eigh_cpu(const at::Tensor& C) {
  check_batched_eigh_inputs(C);
  return batched_eigh_torch(C);
}

#ifdef GALORE_KERNELS_WITH_CUDA
EighResult batched_eigh_cuda(const at::Tensor& C);  // eigh_cuda.cu
#endif

// The op through the dispatcher, so the refresh reaches each device's implementation.
inline EighResult batched_eigh(const at::Tensor& C) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("galore_kernels::batched_eigh", "")
                             .typed<EighResult(const at::Tensor&)>();
  return op.call(C);
}

}  // namespace galore_kernels
