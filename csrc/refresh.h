// Randomized subspace refresh (DESIGN.md "Randomized subspace refresh"), composed of ATen ops.
//
// One implementation for every device: refresh_cpu.cpp and refresh_cuda.cu register it for their
// dispatch keys and differ only in how the orthonormalisation fallbacks are decided (Fallback).
// It reproduces galore_kernels/reference/refresh.py operation for operation, so the two agree to
// rounding (bit for bit on the CPU, where the same ATen kernels run in the same order).
//
// C++17: the GPU machines build with torch 2.11.
#pragma once

// Per-operator headers only: keeps the translation units small (no ATen/Functions.h, so Tensor
// methods rather than the arithmetic operators: Y.mul(Y) is Python's Y * Y).
#ifndef TORCH_ASSERT_ONLY_METHOD_OPERATORS
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#endif

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/full_like.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/where.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace galore_kernels {

// How orthonormalize() decides whether the fallbacks run.
enum class Fallback {
  // Compute a fallback only when some batch entry needs it: one host read of a device flag per
  // fallback level (free on the CPU, a synchronisation on an accelerator).
  kOnDemand,
  // Compute every candidate for every entry and select per entry with at::where: no host round
  // trip, at the price of always running the shifted CholeskyQR3 and Householder QR.
  kAlways,
};

namespace detail {

// After orthonormalisation, ||Q^T Q - I||_max at or above this means the factorisation broke down.
constexpr double kOrthonormalTol = 1e-6;

inline at::Tensor batch_mask(const at::Tensor& ok) {  // (B,) -> (B, 1, 1)
  return ok.unsqueeze(-1).unsqueeze(-1);
}

// Y L^-T where L L^T = C; NaN for the batch entries whose Cholesky failed.
inline at::Tensor cholesky_solve_or_nan(const at::Tensor& Y, const at::Tensor& C) {
  at::Tensor L, info;
  std::tie(L, info) = at::linalg_cholesky_ex(C);
  at::Tensor Q = at::linalg_solve_triangular(L, Y.mT(), /*upper=*/false).mT();
  return at::where(batch_mask(info.eq(0)), Q, at::full_like(Q, std::numeric_limits<double>::quiet_NaN()));
}

// One CholeskyQR pass: Y R^-1 with R^T R = Y^T Y.
inline at::Tensor cholesky_qr(const at::Tensor& Y) {
  return cholesky_solve_or_nan(Y, at::matmul(Y.mT(), Y));
}

// CholeskyQR with the Gram shifted by s*I (Fukaya et al. 2020): survives cond(Y) up to 1/eps.
inline at::Tensor shifted_cholesky_qr(const at::Tensor& Y) {
  const int64_t m = Y.size(-2);
  const int64_t k = Y.size(-1);
  const double eps = std::numeric_limits<double>::epsilon();  // Y is float64
  const at::Tensor norm2 = Y.mul(Y).sum({-2, -1});  // ||Y||_F^2 bounds ||Y||_2^2
  // Same evaluation order as the reference: ((11 * int) * eps) * norm2.
  const double scale = 11.0 * static_cast<double>(m * k + k * (k + 1)) * eps;
  const at::Tensor shift = norm2.mul(scale);
  const at::Tensor C = at::matmul(Y.mT(), Y).add(batch_mask(shift).mul(at::eye(k, Y.options())));
  return cholesky_solve_or_nan(Y, C);
}

inline at::Tensor is_orthonormal(const at::Tensor& Q) {  // (B, m, k) -> (B,) bool
  const int64_t k = Q.size(-1);
  const at::Tensor err = at::matmul(Q.mT(), Q).sub(at::eye(k, Q.options())).abs().amax({-2, -1});
  return err.lt(kOrthonormalTol);  // NaN compares false
}

inline bool needs_fallback(const at::Tensor& ok, Fallback fallback) {
  return fallback == Fallback::kAlways || !ok.all().item<bool>();
}

}  // namespace detail

// ---- input validation (shared by every device) ----

inline void check_orthonormalize_inputs(const at::Tensor& Y) {
  TORCH_CHECK(Y.dim() == 3, "galore_kernels::orthonormalize: Y must be 3-D (B, m, k), got a ", Y.dim(),
              "-D tensor of shape ", Y.sizes());
  TORCH_CHECK(at::isFloatingType(Y.scalar_type()),
              "galore_kernels::orthonormalize: Y must be a real floating-point tensor, got ", Y.scalar_type());
  TORCH_CHECK(Y.size(-1) >= 1 && Y.size(-1) <= Y.size(-2),
              "galore_kernels::orthonormalize: Y (B, m, k) needs 1 <= k <= m (k orthonormal columns of "
              "length m), got shape ",
              Y.sizes());
}

inline void check_randomized_basis_inputs(const at::Tensor& G, const at::Tensor& omega, int64_t rank,
                                          int64_t niter) {
  TORCH_CHECK(G.dim() == 3, "galore_kernels::randomized_basis: G must be 3-D (B, m, n), got a ", G.dim(),
              "-D tensor of shape ", G.sizes());
  TORCH_CHECK(omega.dim() == 3, "galore_kernels::randomized_basis: omega must be 3-D (B, n, k), got a ",
              omega.dim(), "-D tensor of shape ", omega.sizes());
  TORCH_CHECK(at::isFloatingType(G.scalar_type()),
              "galore_kernels::randomized_basis: G must be a floating-point tensor (float32, bfloat16, "
              "float16), got ",
              G.scalar_type());
  TORCH_CHECK(at::isFloatingType(omega.scalar_type()),
              "galore_kernels::randomized_basis: omega must be a floating-point tensor (float32), got ",
              omega.scalar_type());
  TORCH_CHECK(G.device() == omega.device(),
              "galore_kernels::randomized_basis: G and omega must be on the same device, got G on ",
              G.device(), " and omega on ", omega.device());
  const int64_t B = G.size(0), m = G.size(1), n = G.size(2);
  TORCH_CHECK(omega.size(0) == B, "galore_kernels::randomized_basis: batch sizes differ: G ", G.sizes(),
              " has ", B, " matrices, omega ", omega.sizes(), " has ", omega.size(0));
  TORCH_CHECK(omega.size(1) == n, "galore_kernels::randomized_basis: omega must be (B, n, k) with n = ", n,
              " (the columns of G ", G.sizes(), "), got omega of shape ", omega.sizes());
  const int64_t k = omega.size(2);
  TORCH_CHECK(rank >= 1 && rank <= k,
              "galore_kernels::randomized_basis: need 1 <= rank <= k (k = omega.size(-1) = ", k,
              "), got rank ", rank);
  TORCH_CHECK(k <= m && k <= n, "galore_kernels::randomized_basis: need k <= min(m, n) (k = omega.size(-1) = ",
              k, ", G is ", G.sizes(), ")");
  TORCH_CHECK(niter >= 0, "galore_kernels::randomized_basis: niter must be >= 0, got ", niter);
}

// ---- the algorithm ----

// An orthonormal basis of Y's columns, (B, m, k) -> (B, m, k) float32: CholeskyQR2 in float64, then
// for the entries that are not orthonormal shifted CholeskyQR3, then Householder QR.
inline at::Tensor orthonormalize(const at::Tensor& Y, Fallback fallback) {
  using namespace detail;
  const at::Tensor Yd = Y.to(at::kDouble);
  at::Tensor Q = cholesky_qr(cholesky_qr(Yd));
  at::Tensor ok = is_orthonormal(Q);
  if (needs_fallback(ok, fallback)) {
    Q = at::where(batch_mask(ok), Q, cholesky_qr(cholesky_qr(shifted_cholesky_qr(Yd))));
    ok = is_orthonormal(Q);
  }
  if (needs_fallback(ok, fallback)) {
    Q = at::where(batch_mask(ok), Q, std::get<0>(at::linalg_qr(Yd)));
  }
  return Q.to(at::kFloat);
}

// Top-rank left subspace of each G (B, m, n): (B, m, rank) float32 with orthonormal columns.
inline at::Tensor randomized_basis(const at::Tensor& G_in, const at::Tensor& omega, int64_t rank,
                                   int64_t niter, Fallback fallback) {
  const at::Tensor G = G_in.to(at::kFloat);
  const at::Tensor Gt = G.mT();
  at::Tensor Q = orthonormalize(at::matmul(G, omega.to(at::kFloat)), fallback);
  for (int64_t i = 0; i < niter; ++i) {
    const at::Tensor Z = orthonormalize(at::matmul(Gt, Q), fallback);
    Q = orthonormalize(at::matmul(G, Z), fallback);
  }
  const at::Tensor Bd = at::matmul(Q.mT(), G).to(at::kDouble);  // (B, k, n)
  at::Tensor lam, U;
  std::tie(lam, U) = at::linalg_eigh(at::matmul(Bd, Bd.mT()));  // eigenvalues ascending
  const int64_t k = U.size(-1);
  const at::Tensor top = U.slice(-1, k - rank, k).flip({-1});  // (B, k, rank), largest first
  return at::matmul(Q.to(at::kDouble), top).to(at::kFloat);
}

// ---- entry points with validation, guards, and the device's fallback policy ----

template <Fallback kFallback>
at::Tensor orthonormalize_op(const at::Tensor& Y) {
  check_orthonormalize_inputs(Y);
  const c10::DeviceGuard device_guard(Y.device());
  const at::NoGradGuard no_grad;
  return orthonormalize(Y, kFallback);
}

template <Fallback kFallback>
at::Tensor randomized_basis_op(const at::Tensor& G, const at::Tensor& omega, int64_t rank, int64_t niter) {
  check_randomized_basis_inputs(G, omega, rank, niter);
  const c10::DeviceGuard device_guard(G.device());
  const at::NoGradGuard no_grad;
  return randomized_basis(G, omega, rank, niter, kFallback);
}

}  // namespace galore_kernels
