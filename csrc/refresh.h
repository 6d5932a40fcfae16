// Randomized subspace refresh (DESIGN.md "Randomized subspace refresh"), composed of ATen ops.
//
// One implementation for every device: refresh_cpu.cpp and refresh_cuda.cu register it for their
// dispatch keys (a fallback level runs only when some batch entry needs it, see needs_fallback).
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

#include "eigh.h"

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

namespace detail {

// After orthonormalisation, ||Q^T Q - I||_max at or above this means the factorisation broke down.
constexpr double kOrthonormalTol = 1e-6;
// CholeskyQR2 is accepted when the second pass's Gram C2 = Q1^T Q1 has ||C2 - I||_F^2 below this:
// then every eigenvalue of C2 lies in [0.5, 1.5], cond(Q1) <= sqrt(3), and the second pass leaves
// Q orthonormal to rounding. It replaces a separate Q^T Q check (one Gram fewer per call).
constexpr double kSecondGramTol2 = 0.25;
// A single float32 CholeskyQR pass (power iterations) is accepted when every pivot keeps at least
// this fraction of its column's squared norm, L_jj^2 / C_jj (the squared sine of the angle between
// column j and the columns before it): below it the column is numerically dependent in float32.
constexpr double kPivotTol = 1e-12;
// The same test for a float32 Gram: L_jj^2 / C_jj >= 1 / cond^2, so 1e-6 admits sketch condition
// numbers up to ~1e3, where the float32 Gram's relative error eps32 * cond^2 ~ 0.06 still leaves a
// well-conditioned basis (cond(Q) ~ 1.1); beyond, the pass is redone with a float64 Gram.
constexpr double kPivotTolFp32 = 1e-6;

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

// One CholeskyQR pass (fallback chain): Y R^-1 with R^T R = Y^T Y.
inline at::Tensor cholesky_qr(const at::Tensor& Y) {
  return cholesky_solve_or_nan(Y, at::matmul(Y.mT(), Y));
}

// One CholeskyQR pass with a gram_dtype (float64 or float32) Gram, applied as a matrix product:
// Y L^-T with L L^T = Y^T Y, in Y's dtype (float32 or float64). L^-T is formed explicitly (k x k), so
// the m x k work is two GEMMs (Gram and product) instead of a Gram and a triangular solve.
// Returns {Q, ok (B,) bool: the Cholesky succeeded and L^-T is finite in Y's dtype, C (the Gram)}.
// With pivot_tol > 0, ok also needs min_j L_jj^2 / C_jj > pivot_tol.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cholesky_qr_pass(const at::Tensor& Y, double pivot_tol,
                                                                       at::ScalarType gram_dtype = at::kDouble) {
  const int64_t k = Y.size(-1);
  const at::Tensor Yd = Y.to(gram_dtype);
  const at::Tensor C = at::matmul(Yd.mT(), Yd);
  at::Tensor L, info;
  std::tie(L, info) = at::linalg_cholesky_ex(C);
  const at::Tensor W = at::linalg_solve_triangular(L, at::eye(k, Yd.options()), /*upper=*/false).mT().to(Y.scalar_type());
  at::Tensor ok = info.eq(0).logical_and(W.isfinite().all(-1).all(-1));
  if (pivot_tol > 0) {
    const at::Tensor ratio = L.diagonal(0, -2, -1).square().div(C.diagonal(0, -2, -1));
    ok = ok.logical_and(ratio.gt(pivot_tol).all(-1));  // NaN (a zero column) compares false
  }
  return std::make_tuple(at::matmul(Y, W), ok, C);
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

inline at::Tensor near_identity(const at::Tensor& C) {  // (B, k, k) -> (B,) bool: ||C - I||_F^2 < tol
  const int64_t k = C.size(-1);
  return C.sub(at::eye(k, C.options())).square().sum({-2, -1}).lt(kSecondGramTol2);  // NaN: false
}

// Whether any batch entry needs the next fallback level. A fallback is computed only then: one host
// read of a device flag per level and call (free on the CPU, a synchronisation on a GPU, where
// computing every fallback for every entry would cost a Householder QR per power iteration).
inline bool needs_fallback(const at::Tensor& ok) {
  return !ok.all().item<bool>();
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

// An orthonormal basis of Y's columns, (B, m, k) -> (B, m, k) float32: CholeskyQR2 in float64
// (accepted on its second Gram), then for the entries where that failed shifted CholeskyQR3, then
// Householder QR. Every entry comes out orthonormal, whatever its rank.
inline at::Tensor orthonormalize(const at::Tensor& Y) {
  using namespace detail;
  const at::Tensor Yd = Y.to(at::kDouble);
  at::Tensor Q1, ok1, C1, Q, ok2, C2;
  std::tie(Q1, ok1, C1) = cholesky_qr_pass(Yd, /*pivot_tol=*/0.0);
  std::tie(Q, ok2, C2) = cholesky_qr_pass(Q1, /*pivot_tol=*/0.0);
  at::Tensor ok = ok1.logical_and(ok2).logical_and(near_identity(C2));
  if (needs_fallback(ok)) {
    Q = at::where(batch_mask(ok), Q, cholesky_qr(cholesky_qr(shifted_cholesky_qr(Yd))));
    ok = is_orthonormal(Q);
  }
  if (needs_fallback(ok)) {
    Q = at::where(batch_mask(ok), Q, std::get<0>(at::linalg_qr(Yd)));
  }
  return Q.to(at::kFloat);
}

// A well-conditioned basis of Y's columns for a power iteration, (B, m, k) float32 -> float32: one
// CholeskyQR pass with a float32 Gram; the entries where it breaks down (a failed Cholesky, a pivot
// ratio at or below kPivotTolFp32, an overflow) redo it with a float64 Gram, and those where that
// breaks down too get orthonormalize().
inline at::Tensor power_basis(const at::Tensor& Y) {
  using namespace detail;
  at::Tensor Q, ok, C;
  std::tie(Q, ok, C) = cholesky_qr_pass(Y, kPivotTolFp32, at::kFloat);
  if (needs_fallback(ok)) {
    at::Tensor Q64, ok64, C64;
    std::tie(Q64, ok64, C64) = cholesky_qr_pass(Y, kPivotTol);
    Q = at::where(batch_mask(ok), Q, Q64);
    ok = ok.logical_or(ok64);
    if (needs_fallback(ok)) {
      Q = at::where(batch_mask(ok), Q, orthonormalize(Y));
    }
  }
  return Q;
}

// Top-rank left singular vectors of Y (B, m, k) float32 from the eigenvectors of its float64 Gram
// (batched_eigh: one solver call for the batch), P0 = Y V_top lam_top^-1/2, then one CholeskyQR pass
// of the m x rank P0 (float64 Gram). Returns {P (B, m, rank) float32, ok (B,) bool: the eigensolver
// converged and that pass was accepted, its Gram within the CholeskyQR2 bound of I}.
inline std::tuple<at::Tensor, at::Tensor> ritz_basis(const at::Tensor& Y, int64_t rank) {
  using namespace detail;
  const int64_t k = Y.size(-1);
  const at::Tensor Yd = Y.to(at::kDouble);
  at::Tensor lam, V, info;
  std::tie(lam, V, info) = batched_eigh(at::matmul(Yd.mT(), Yd));  // eigenvalues ascending
  const at::Tensor top = V.slice(-1, k - rank, k).flip({-1});  // (B, k, rank), largest first
  const at::Tensor scale = lam.slice(-1, k - rank, k).flip({-1}).sqrt().unsqueeze(-2);  // (B, 1, rank)
  const at::Tensor P0 = at::matmul(Y, top.div(scale).to(at::kFloat));
  at::Tensor P, ok, C;
  std::tie(P, ok, C) = cholesky_qr_pass(P0, /*pivot_tol=*/0.0);
  return std::make_tuple(P, ok.logical_and(near_identity(C)).logical_and(info.eq(0)));
}

// Q = orth(Y), R = Q^T A, P = Q times the top eigenvectors of R R^T (A = G, or A = Y = G Z).
inline at::Tensor ritz_from_orth(const at::Tensor& Y, const at::Tensor& A, int64_t rank) {
  const at::Tensor Q = orthonormalize(Y);
  const at::Tensor R = at::matmul(Q.mT(), A).to(at::kDouble);  // (B, k, n) or (B, k, k)
  at::Tensor lam, U;
  std::tie(lam, U) = at::linalg_eigh(at::matmul(R, R.mT()));  // eigenvalues ascending
  const int64_t k = U.size(-1);
  const at::Tensor top = U.slice(-1, k - rank, k).flip({-1});  // (B, k, rank), largest first
  return at::matmul(Q, top.to(at::kFloat));
}

// Top-rank left subspace of each G (B, m, n): (B, m, rank) float32 with orthonormal columns.
//   Y = G Omega; niter times { Q = basis(Y); Z = basis(G^T Q); Y = G Z }
// then Rayleigh-Ritz: with niter > 0, Z has orthonormal columns, so the top-rank left singular
// vectors of G Z Z^T are those of Y = G Z, from the k x k Gram Y^T Y (ritz_basis: no k x n product
// with G, no orthonormalisation of the m x k Y); entries it does not accept (rank of G below rank)
// take ritz_from_orth(Y, Y). With niter = 0, Q = orth(Y) and B = Q^T G.
inline at::Tensor randomized_basis(const at::Tensor& G_in, const at::Tensor& omega, int64_t rank,
                                   int64_t niter) {
  using namespace detail;
  const at::Tensor G = G_in.to(at::kFloat);
  const at::Tensor Gt = G.mT();
  at::Tensor Y = at::matmul(G, omega.to(at::kFloat));
  for (int64_t i = 0; i < niter; ++i) {
    const at::Tensor Q = power_basis(Y);
    const at::Tensor Z = power_basis(at::matmul(Gt, Q));
    Y = at::matmul(G, Z);
  }
  if (niter == 0) {
    return ritz_from_orth(Y, G, rank);
  }
  at::Tensor P, ok;
  std::tie(P, ok) = ritz_basis(Y, rank);
  if (needs_fallback(ok)) {
    P = at::where(batch_mask(ok), P, ritz_from_orth(Y, Y, rank));
  }
  return P;
}

// ---- entry points with validation and guards ----

inline at::Tensor orthonormalize_op(const at::Tensor& Y) {
  check_orthonormalize_inputs(Y);
  const c10::DeviceGuard device_guard(Y.device());
  const at::NoGradGuard no_grad;
  return orthonormalize(Y);
}

inline at::Tensor randomized_basis_op(const at::Tensor& G, const at::Tensor& omega, int64_t rank, int64_t niter) {
  check_randomized_basis_inputs(G, omega, rank, niter);
  const c10::DeviceGuard device_guard(G.device());
  const at::NoGradGuard no_grad;
  return randomized_basis(G, omega, rank, niter);
}

}  // namespace galore_kernels
