// galore_kernels::batched_eigh on CUDA: cusolverDnXsyevBatched (cuSOLVER >= 11.7.1), which solves a
// whole batch of symmetric eigenproblems in one call, of any size. torch.linalg.eigh takes that path
// only for n <= 32 and otherwise runs syevd once per matrix (the anchor H200: 5.3 ms for one k = 522
// Gram, 41 ms for eight). Host code only.
//
// cuSOLVER is reached through dlopen/dlsym of the library torch itself uses (already loaded, or
// loadable by its soname): no link dependency and no cuSOLVER headers at build time. Where the
// symbol is missing (an older cuSOLVER), or a call fails, the op answers with at::linalg_eigh and
// warns once. GALORE_KERNELS_EIGH chooses per process: "auto" (default: cuSOLVER's batched solver for
// two matrices or more, at::linalg_eigh for one), "batched" (always the batched solver, and an error
// where it cannot run: what tests and benchmarks of this path ask for), "torch".
#include "eigh.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <library_types.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace galore_kernels {
namespace {

using Status = int;    // cusolverStatus_t: 0 is CUSOLVER_STATUS_SUCCESS
using Handle = void*;  // cusolverDnHandle_t
using Params = void*;  // cusolverDnParams_t
constexpr int kEigModeVector = 1;  // CUSOLVER_EIG_MODE_VECTOR
constexpr int kFillModeLower = 0;  // CUBLAS_FILL_MODE_LOWER (the input is symmetric: either triangle)

struct Cusolver {
  Status (*create)(Handle*);
  Status (*set_stream)(Handle, cudaStream_t);
  Status (*create_params)(Params*);
  Status (*destroy_params)(Params);
  Status (*buffer_size)(Handle, Params, int, int, int64_t, cudaDataType, const void*, int64_t, cudaDataType,
                        const void*, cudaDataType, size_t*, size_t*, int64_t);
  Status (*solve)(Handle, Params, int, int, int64_t, cudaDataType, void*, int64_t, cudaDataType, void*,
                  cudaDataType, void*, size_t, void*, size_t, int*, int64_t);
};

template <typename Fn>
bool find(void* library, const char* name, Fn* out) {
  *out = reinterpret_cast<Fn>(dlsym(library, name));
  return *out != nullptr;
}

void* loaded_cusolver() {  // RTLD_NOLOAD finds a loaded library whatever scope it was loaded in
  for (const char* name : {"libcusolver.so.12", "libcusolver.so.11", "libcusolver.so"}) {
    if (void* library = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) return library;
  }
  return nullptr;
}

// The cuSOLVER torch uses: loaded already, or by torch's first CUDA linear-algebra call (torch loads
// its linear-algebra library, and with it cuSOLVER, lazily), or last by its soname.
void* open_cusolver(const at::Tensor& like) {
  if (void* library = loaded_cusolver()) return library;
  at::linalg_eigh(at::eye(2, like.options()));
  if (void* library = loaded_cusolver()) return library;
  for (const char* name : {"libcusolver.so.12", "libcusolver.so.11"}) {
    if (void* library = dlopen(name, RTLD_NOW | RTLD_LOCAL)) return library;
  }
  return nullptr;
}

const Cusolver* load_cusolver(const at::Tensor& like) {
  void* library = open_cusolver(like);
  if (library == nullptr) return nullptr;
  static Cusolver table;
  const bool complete = find(library, "cusolverDnCreate", &table.create) &&
                        find(library, "cusolverDnSetStream", &table.set_stream) &&
                        find(library, "cusolverDnCreateParams", &table.create_params) &&
                        find(library, "cusolverDnDestroyParams", &table.destroy_params) &&
                        find(library, "cusolverDnXsyevBatched_bufferSize", &table.buffer_size) &&
                        find(library, "cusolverDnXsyevBatched", &table.solve);
  return complete ? &table : nullptr;
}

const Cusolver* cusolver(const at::Tensor& like) {  // null when this cuSOLVER has no batched solver
  static const Cusolver* table = load_cusolver(like);
  return table;
}

// One cuSOLVER handle per device, made on first use and kept (as torch keeps its own pool); calls are
// serialised, since a handle must not be used by two threads at once.
std::mutex handle_mutex;
Handle device_handle(const Cusolver& lib, int device) {
  static std::unordered_map<int, Handle> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  Handle handle = nullptr;
  if (lib.create(&handle) != 0) return nullptr;
  handles.emplace(device, handle);
  return handle;
}

enum class Solver { kTorch, kBatched, kBatchedOnly };

Solver solver_for(int64_t batch) {
  const char* setting = std::getenv("GALORE_KERNELS_EIGH");
  const std::string choice = setting == nullptr ? "auto" : setting;
  if (choice == "torch") return Solver::kTorch;
  if (choice == "batched") return Solver::kBatchedOnly;
  TORCH_CHECK(choice == "auto", "GALORE_KERNELS_EIGH=", choice, ": use auto (the default), batched or torch");
  return batch >= 2 ? Solver::kBatched : Solver::kTorch;
}

// Solves V (B, n, n) in place: each matrix is symmetric, so its row-major storage is the column-major
// matrix cuSOLVER reads, and the eigenvectors come back as the rows of V. False on a cuSOLVER error.
bool solve_in_place(const Cusolver& lib, at::Tensor& V, at::Tensor& W, at::Tensor& info) {
  const int64_t batch = V.size(0), n = V.size(1);
  const cudaDataType type = V.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;
  const int64_t per_call = std::max<int64_t>(1, INT32_MAX / (n * n));  // cuSOLVER: n * lda * batch <= INT32_MAX
  const size_t element = V.element_size();
  std::lock_guard<std::mutex> lock(handle_mutex);
  Handle handle = device_handle(lib, V.get_device());
  if (handle == nullptr || lib.set_stream(handle, c10::cuda::getCurrentCUDAStream().stream()) != 0) return false;
  Params params = nullptr;
  if (lib.create_params(&params) != 0) return false;
  bool ok = true;
  for (int64_t start = 0; start < batch && ok; start += per_call) {
    const int64_t count = std::min(per_call, batch - start);
    char* a = static_cast<char*>(V.data_ptr()) + start * n * n * element;
    char* w = static_cast<char*>(W.data_ptr()) + start * n * element;
    size_t device_bytes = 0, host_bytes = 0;
    ok = lib.buffer_size(handle, params, kEigModeVector, kFillModeLower, n, type, a, n, type, w, type,
                         &device_bytes, &host_bytes, count) == 0;
    if (!ok) break;
    at::Tensor device_work = at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))},
                                       V.options().dtype(at::kByte));
    std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
    ok = lib.solve(handle, params, kEigModeVector, kFillModeLower, n, type, a, n, type, w, type,
                   device_work.data_ptr(), device_bytes, host_work.data(), host_bytes,
                   info.data_ptr<int>() + start, count) == 0;
  }
  lib.destroy_params(params);
  return ok;
}

}  // namespace

EighResult batched_eigh_cuda(const at::Tensor& C) {
  check_batched_eigh_inputs(C);
  TORCH_CHECK(C.is_cuda(), "galore_kernels::batched_eigh (CUDA): C must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(C.device());
  const int64_t batch = C.size(0), n = C.size(1);
  const Solver solver = solver_for(batch);
  if (solver == Solver::kTorch || batch == 0 || n == 0) {
    return batched_eigh_torch(C);
  }
  const Cusolver* lib = cusolver(C);
  TORCH_CHECK(lib != nullptr || solver != Solver::kBatchedOnly, "GALORE_KERNELS_EIGH=batched, but this cuSOLVER "
              "has no cusolverDnXsyevBatched (cuSOLVER >= 11.7.1, CUDA >= 12.6.2, needed)");
  if (lib == nullptr) {
    TORCH_WARN_ONCE("galore_kernels: this cuSOLVER has no cusolverDnXsyevBatched; the refresh solves its "
                    "eigenproblems with torch.linalg.eigh, one matrix after another");
    return batched_eigh_torch(C);
  }
  at::Tensor V = C.contiguous().clone();
  at::Tensor W = at::empty({batch, n}, C.options());
  at::Tensor info = at::empty({batch}, C.options().dtype(at::kInt));
  if (!solve_in_place(*lib, V, W, info)) {
    TORCH_CHECK(solver != Solver::kBatchedOnly, "GALORE_KERNELS_EIGH=batched, but cusolverDnXsyevBatched failed");
    TORCH_WARN_ONCE("galore_kernels: cusolverDnXsyevBatched failed; the refresh uses torch.linalg.eigh instead");
    return batched_eigh_torch(C);
  }
  // The rows of V are the eigenvectors: as columns, V^T (the column-major layout linalg.eigh returns).
  return std::make_tuple(W, V.mT(), info);
}

}  // namespace galore_kernels
