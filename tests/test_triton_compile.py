"""Ahead-of-time compilation of every Triton kernel variant the launchers can pick, for sm_90.

The interpreter (tests/triton_interp) accepts kernels the compiler rejects (dot shapes, layouts,
dtype rules), and CI has no GPU: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` runs the whole
compiler down to a cubin here. The precision mapping of float32 matmuls is checked beside it.
"""
import itertools
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled
    pytest.skip("ahead-of-time compilation needs compiled (not interpreted) kernels: unset TRITON_INTERPRET",
                allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from galore_kernels.triton_ops import adam, back_apply, nonfinite, project, utils  # noqa: E402
from triton_parity import projection_launch  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DEVICE_CONFIGS = utils.GEMM_CONFIGS  # {kernel: {name: GemmConfig}}
TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# The projection's integer arguments (split_stride and split_steps: utils.project_splits); its
# finite_bound is a float32.
PROJECT_INTS = ("out_batch_stride", "split_stride", "split_steps", "M", "N", "K", "stride_am", "stride_ak", "stride_bk",
                "stride_bn")


# The back-projection's runtime arguments.
BACK_APPLY_SIGNATURE = {"a_table": "*i64", "b_table": "*i64", "w_table": "*i64", "lr_ptr": "*fp32",
                        "nonfinite_ptr": "*i32", "seeds_ptr": "*i64", "steps_ptr": "*i32", "M": "i32", "N": "i32",
                        "K": "i32", "weight_decay": "fp32"}


def compile_kernel(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages,
                                                              "enable_fp_fusion": utils.FP_FUSION})
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def gemm_variants(kernel: str):
    """(config name, operand dtype, fp32 precision) as gemm_config/dot_precision can return them."""
    for name, cfg in DEVICE_CONFIGS[kernel].items():
        dtypes = [torch.float32] if name.endswith("fp32") else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            for precision in (sorted(set(utils.FP32_PRECISION.values())) if dtype == torch.float32 else ["ieee"]):
                yield name, dtype, precision


def basis_variants(kernel: str):
    """GEMM variants times the basis dtype: float32 (any caller) or, for 16-bit parameters, their
    own dtype (what the optimizer passes)."""
    for config, dtype, precision in gemm_variants(kernel):
        for basis in ([torch.float32] if dtype == torch.float32 else [torch.float32, dtype]):
            yield config, dtype, precision, basis


def back_apply_variants():
    """basis_variants, plus stochastic rounding for bf16 weights."""
    for config, dtype, precision, basis in basis_variants("back_apply"):
        for stochastic in ((False, True) if dtype == torch.bfloat16 else (False,)):
            yield config, dtype, precision, basis, stochastic


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config, dtype, precision, basis", list(basis_variants("project")))
def test_project_kernel_compiles(side, config, dtype, precision, basis):
    cfg = DEVICE_CONFIGS["project"][config]
    a_dtype, b_dtype = (basis, dtype) if side == "left" else (dtype, basis)
    signature = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
                 "finite_bound": "fp32", **{k: "i32" for k in PROJECT_INTS}}
    compile_kernel(project._lowrank_project_kernel, signature, dict(
        A_DTYPE=utils.TORCH_TO_TL[a_dtype], B_DTYPE=utils.TORCH_TO_TL[b_dtype], OPERAND=utils.TORCH_TO_TL[dtype],
        PRECISION=precision, INTERPRETER=False, TMA=False, RANK_ON_M=side == "left",
        A_K_MAJOR=side == "right" or precision == "tf32", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config, dtype, precision, basis, stochastic", list(back_apply_variants()))
def test_back_apply_kernel_compiles(side, config, dtype, precision, basis, stochastic):
    cfg = DEVICE_CONFIGS["back_apply"][config]  # N is always in the parameters' dtype
    a_dtype, b_dtype = (basis, dtype) if side == "left" else (dtype, basis)
    signature = BACK_APPLY_SIGNATURE
    compile_kernel(back_apply._back_apply_kernel, signature, dict(
        A_DTYPE=utils.TORCH_TO_TL[a_dtype], B_DTYPE=utils.TORCH_TO_TL[b_dtype], W_DTYPE=utils.TORCH_TO_TL[dtype],
        OPERAND=utils.TORCH_TO_TL[dtype], PRECISION=precision, STOCHASTIC=stochastic, INTERPRETER=False, TMA=False,
        B_K_MAJOR=precision == "tf32", PREFETCH_W=utils.prefetch_weight(cfg, dtype.itemsize),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)


# Low-rank: the gradient operand is R (float32) and N comes out in the parameters' dtype; dense:
# gradient and weight in the parameters' dtype.
# Stochastic rounding: dense bf16 weights only (low-rank N is never rounded stochastically). Dense
# 16-bit weights also take a float32 gradient (layer-wise mode's accumulated one).
# Low-rank R may arrive as partial products of a split projection (SPLITS > 1: one unrolled loop, so
# 3 stands for every count).
ADAM_VARIANTS = [(dense, dtype, grad, bias, state, stochastic, splits) for dense in (False, True)
                 for dtype in utils.SUPPORTED_DTYPES
                 for grad in ({dtype, torch.float32} if dense else {torch.float32})
                 for bias in (True, False) for state in utils.STATE_DTYPES
                 for stochastic in ((False, True) if dense and dtype == torch.bfloat16 else (False,))
                 for splits in ((1,) if dense else (1, 3))]


@pytest.mark.parametrize("dense, dtype, grad_dtype, correct_bias, state_dtype, stochastic, splits", ADAM_VARIANTS)
def test_adam_kernel_compiles(dense, dtype, grad_dtype, correct_bias, state_dtype, stochastic, splits):
    signature = {"grad_table": "*i64", "exp_avg_table": "*i64", "exp_avg_sq_table": "*i64", "out_table": "*i64",
                 "steps_ptr": "*i32", "lr_ptr": "*fp32", "nonfinite_ptr": "*i32", "seeds_ptr": "*i64", "numel": "i32",
                 "split_stride": "i32",
                 **{k: "fp32" for k in ("beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay", "scale")}}
    compile_kernel(adam._adam_kernel, signature, dict(
        GRAD_DTYPE=utils.TORCH_TO_TL[grad_dtype], SPLITS=splits, STATE_DTYPE=utils.TORCH_TO_TL[state_dtype],
        OUT_DTYPE=utils.TORCH_TO_TL[dtype], DENSE=dense,
        CORRECT_BIAS=correct_bias, STOCHASTIC=stochastic, INTERPRETER=False, BLOCK=utils.ELEMENTWISE_BLOCK),
        utils.ELEMENTWISE_WARPS)


@pytest.mark.parametrize("dtype", utils.SUPPORTED_DTYPES)
def test_nonfinite_kernel_compiles(dtype):
    compile_kernel(nonfinite._nonfinite_kernel, {"table": "*i64", "nonfinite_ptr": "*i32", "numel": "i32"},
                   dict(DTYPE=utils.TORCH_TO_TL[dtype], BLOCK=utils.ELEMENTWISE_BLOCK), utils.ELEMENTWISE_WARPS)


@pytest.mark.parametrize("operand, precision, tensor_cores", [
    (torch.bfloat16, "ieee", True), (torch.float32, "tf32", True), (torch.float32, "ieee", False)])
def test_matrix_instructions_follow_precision(operand, precision, tensor_cores):
    """bf16 and TF32 projections issue Hopper's warpgroup MMA (wgmma); IEEE float32 must not touch
    the tensor cores (it would silently be TF32), so it is plain FMA."""
    cfg = DEVICE_CONFIGS["project"]["wide_16bit" if operand != torch.float32 else "wide_fp32"]
    signature = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
                 "finite_bound": "fp32", **{k: "i32" for k in PROJECT_INTS}}
    compiled = compile_kernel(project._lowrank_project_kernel, signature, dict(
        A_DTYPE=tl.float32, B_DTYPE=utils.TORCH_TO_TL[operand], OPERAND=utils.TORCH_TO_TL[operand],
        PRECISION=precision, INTERPRETER=False, TMA=False, RANK_ON_M=False, A_K_MAJOR=True, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)
    ptx = compiled.asm["ptx"]
    assert ("wgmma" in ptx) == tensor_cores and "mma.sync" not in ptx
    assert tensor_cores or "fma.rn.f32" in ptx


def test_launchers_pick_only_compiled_configs():
    shapes = [(m, n) for m, n in itertools.product([8, 64, 512, 1024, 4096, 11008], repeat=2)]
    for kernel, (m, n), dtype, batch in itertools.product(utils.GEMM_KERNELS, shapes, utils.SUPPORTED_DTYPES, [1, 4, 96]):
        assert utils.gemm_config(kernel, m, n, dtype, batch) in DEVICE_CONFIGS[kernel].values()


def test_float32_projection_takes_the_large_tile_where_it_fills_the_gpu():
    """The 8-warp 128x128 float32 projection tile (H200: TF32 4096x11008 r512 1.55 -> 1.03 ms) where
    its programs still reach MIN_PROGRAMS; else the 64x128 one, then the square one; 16-bit and the
    back-projection keep their tables."""
    table = DEVICE_CONFIGS["project"]
    assert utils.gemm_config("project", 512, 11008, torch.float32) == table["large_fp32"]  # 4 x 86 programs
    assert utils.gemm_config("project", 4096, 512, torch.float32) == table["wide_fp32"]  # 32 x 4 = 128 < 132
    assert utils.gemm_config("project", 4096, 512, torch.float32, batch=2) == table["large_fp32"]
    assert utils.gemm_config("project", 4096, 128, torch.float32) == table["square_fp32"]  # 64 x 1 = 64
    assert utils.gemm_config("project", 512, 11008, torch.bfloat16) == table["wide_16bit"]
    assert utils.gemm_config("back_apply", 4096, 11008, torch.float32) == DEVICE_CONFIGS["back_apply"]["wide_fp32"]


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_matmul_precision_follows_torch(setting, expected):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert utils.dot_precision(torch.float32) == expected
        assert utils.dot_precision(torch.bfloat16) == "ieee"  # 16-bit operands: the flag is unused
    finally:
        torch.set_float32_matmul_precision(previous)


def _ptx(kernel, signature: dict, constexprs: dict, divisible: tuple, num_warps=4, num_stages=3) -> str:
    """PTX as the JIT would build it for real launches: the listed arguments marked 16-divisible
    (Triton does that for aligned pointers and sizes), unit strides passed as constants. Attributes
    are keyed by the argument's position in the kernel's own parameter list (a constant stride
    between runtime ones shifts the positions of those after it)."""
    names = list(kernel.arg_names)
    missing = [k for k in names if k not in signature and k not in constexprs]
    assert not missing, f"no type or value for {missing}"  # a missing constexpr would silently be None
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    full = {k: signature.get(k, "constexpr") for k in names}
    source = triton.compiler.ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": utils.FP_FUSION}
    return triton.compile(source, target=TARGET, options=options).asm["ptx"]


def _copy_widths(ptx: str) -> set:
    """Byte widths of the global -> shared asynchronous copies (cp.async) in ``ptx``."""
    return {int(w, 16) for w in re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+)", ptx)}


# Operand layouts of the real launches: unit strides are constants (the JIT specialises 1), the
# others runtime and 16-divisible. left: A = P^T read from P (m x r), B = G; right: A = G, B = Q^T from Q.
# With TF32 the left projection reads P^T from a transposed copy (r x m: K-major).
PROJECT_LAYOUTS = {"left": dict(stride_am=1, stride_bn=1), "right": dict(stride_ak=1, stride_bk=1),
                   "left_k_major": dict(stride_ak=1, stride_bn=1)}


def gemm_ptx(side: str, config: str, dtype: torch.dtype, precision: str, tma: bool) -> dict:
    """{kernel name: sm_90 PTX} of both GEMM kernels for one side, configuration and operand dtype,
    with the hints the JIT gives real launches (split_steps, any count of K steps, without one)."""
    cfg = DEVICE_CONFIGS["project"][config]
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    operand = utils.TORCH_TO_TL[dtype]
    a_k_major = side == "right" or precision == "tf32"  # project_partials_triton's choice
    layout = PROJECT_LAYOUTS["left_k_major" if side == "left" and a_k_major else side]
    sig = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
           "finite_bound": "fp32", **{k: "i32" for k in PROJECT_INTS if k not in layout}}
    project_ptx = _ptx(project._lowrank_project_kernel, sig, dict(
        A_DTYPE=operand, B_DTYPE=operand, OPERAND=operand, PRECISION=precision, INTERPRETER=False, TMA=tma,
        RANK_ON_M=side == "left", A_K_MAJOR=a_k_major, **layout, **tiles),
        tuple(k for k in sig if k not in ("split_steps", "finite_bound")), cfg.num_warps, cfg.num_stages)
    if config not in DEVICE_CONFIGS["back_apply"]:  # a tile only the projection's table has
        return {"project": project_ptx}
    cfg = DEVICE_CONFIGS["back_apply"][config]
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    sig = BACK_APPLY_SIGNATURE
    back_ptx = _ptx(back_apply._back_apply_kernel, sig, dict(
        A_DTYPE=operand, B_DTYPE=operand, W_DTYPE=operand, OPERAND=operand, PRECISION=precision, STOCHASTIC=False,
        INTERPRETER=False, TMA=tma, B_K_MAJOR=precision == "tf32",
        PREFETCH_W=utils.prefetch_weight(cfg, dtype.itemsize), **tiles), tuple(k for k in sig if k != "weight_decay"), cfg.num_warps, cfg.num_stages)
    return {"project": project_ptx, "back_apply": back_ptx}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config, dtype", [(c, d) for c, d, p in gemm_variants("project") if p == "ieee"])
def test_gemm_operands_are_copied_in_16_byte_vectors(side, config, dtype):
    """Every projection and back-projection operand reaches shared memory in 16-byte cp.async copies
    for bf16/fp16 and IEEE float32 (a 4-byte copy is a transposing copy, four times the instructions:
    what TF32's wgmma, which takes K-major operands only, makes of any other layout; see below)."""
    for name, ptx in gemm_ptx(side, config, dtype, "ieee", tma=False).items():
        assert _copy_widths(ptx) == {16}, (name, _copy_widths(ptx))


@pytest.mark.parametrize("config", ["wide_fp32", "large_fp32"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_tf32_gemms_read_k_major_operands_in_16_byte_vectors(side, config):
    """TF32 wgmma reads only K-major operands: the back-projection gets B (N, or Q) transposed by
    the launcher (utils.k_major_operands), the left projection P^T, and the right projection's
    operands are K-major as stored, so these copy 16 bytes at a time. The left projection's G is
    not (its rows are the reduction): its copies stay 4-byte (RESULTS.md)."""
    ptx = gemm_ptx(side, config, torch.float32, "tf32", tma=False)
    assert "wgmma" in ptx["project"]
    if "back_apply" in ptx:
        assert "wgmma" in ptx["back_apply"]
        assert _copy_widths(ptx["back_apply"]) == {16}, _copy_widths(ptx["back_apply"])
    assert _copy_widths(ptx["project"]) == ({16} if side == "right" else {4, 16}), _copy_widths(ptx["project"])


def test_16bit_operands_reach_the_tensor_cores_without_conversion():
    """With N and the basis stored in bf16 (what the optimizer passes for bf16 weights) the GEMMs
    load 16-byte vectors straight into shared memory and convert nothing but the weight in the
    epilogue; with float32 operands every tile would go through registers to be converted."""
    cfg = DEVICE_CONFIGS["back_apply"]["wide_16bit"]
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    sig = BACK_APPLY_SIGNATURE
    divisible = ("a_table", "b_table", "w_table", "lr_ptr", "nonfinite_ptr", "seeds_ptr", "steps_ptr", "M", "N", "K")
    conversions = {}
    for operand in (tl.float32, tl.bfloat16):
        ptx = _ptx(back_apply._back_apply_kernel, sig, dict(
            A_DTYPE=operand, B_DTYPE=operand, W_DTYPE=tl.bfloat16, OPERAND=tl.bfloat16, PRECISION="ieee",
            STOCHASTIC=False, INTERPRETER=False, TMA=False, B_K_MAJOR=False, PREFETCH_W=True, **tiles), divisible)
        assert "wgmma.mma_async" in ptx and "cp.async.cg" in ptx  # 16-byte asynchronous copies
        conversions[operand] = ptx.count("cvt.rn.bf16x2.f32")
    assert conversions[tl.bfloat16] < conversions[tl.float32] / 2, conversions
    cfg = DEVICE_CONFIGS["project"]["wide_16bit"]
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    sig = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
           "finite_bound": "fp32", **{k: "i32" for k in PROJECT_INTS if k not in ("stride_am", "stride_bn")}}
    ptx = _ptx(project._lowrank_project_kernel, sig, dict(
        A_DTYPE=tl.bfloat16, B_DTYPE=tl.bfloat16, OPERAND=tl.bfloat16, PRECISION="ieee", INTERPRETER=False,
        TMA=False, RANK_ON_M=True, A_K_MAJOR=False, stride_am=1, stride_bn=1, **tiles),
        tuple(k for k in sig if k not in ("split_steps", "finite_bound")))
    assert "wgmma.mma_async" in ptx and "cp.async.cg" in ptx and "cvt.rn.bf16x2.f32" not in ptx


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config, dtype, precision", list(gemm_variants("project")))
def test_tma_variants_load_every_operand_by_bulk_tensor_copies(side, config, dtype, precision):
    """With a configuration's tma flag (the sweep's candidates), both GEMMs build device-side
    descriptors and load every operand tile with cp.async.bulk.tensor (no per-thread copies left)."""
    for name, ptx in gemm_ptx(side, config, dtype, precision, tma=True).items():
        assert "cp.async.bulk.tensor" in ptx and not _copy_widths(ptx), (name, _copy_widths(ptx))


def test_tma_needs_rows_of_16_byte_multiples_and_keeps_a_users_allocator():
    from triton.runtime import _allocation

    tma = utils.GemmConfig(64, 128, 64, 4, 3, tma=True)
    assert utils.tma_ready(tma, (160, 32)) and not utils.tma_ready(tma, (160, 62))
    assert not utils.tma_ready(utils.GemmConfig(64, 128, 64, 4, 3), (160, 32))  # not asked for
    previous = _allocation._allocator.get()
    try:
        _allocation._allocator.set(_allocation.NullAllocator())
        utils._ensure_allocator()
        assert _allocation._allocator.get() is utils._torch_allocation
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        utils._ensure_allocator()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.set(previous)


def test_gemm_config_overrides_take_optional_tma_and_split_fields(monkeypatch):
    monkeypatch.setenv(utils.GEMM_CONFIG_ENV, "128,128,64,8,3,1")
    for kernel in utils.GEMM_KERNELS:
        assert utils.gemm_config(kernel, 4096, 4096, torch.bfloat16) == utils.GemmConfig(128, 128, 64, 8, 3, tma=True)
    monkeypatch.setenv(utils.GEMM_CONFIG_ENV, "128,128,64,8,3")
    assert utils.gemm_config("project", 4096, 4096, torch.bfloat16).tma is False
    # A kernel's own setting wins over the shared one, for that kernel only.
    monkeypatch.setenv(utils.GEMM_CONFIG_ENVS["project"], "64,256,64,4,4,0,3")
    assert utils.gemm_config("project", 512, 4096, torch.bfloat16) == utils.GemmConfig(64, 256, 64, 4, 4, False, 3)
    assert utils.gemm_config("back_apply", 4096, 4096, torch.bfloat16) == utils.GemmConfig(128, 128, 64, 8, 3)
    monkeypatch.setenv(utils.GEMM_CONFIG_ENV, "128,128,64")
    with pytest.raises(ValueError, match="five to seven integers"):
        utils.gemm_config("back_apply", 4096, 4096, torch.bfloat16)
    monkeypatch.setenv(utils.GEMM_CONFIG_ENV, "128,128,64,8,3,0,2")
    with pytest.raises(ValueError, match="split_k applies to the projection only"):
        utils.gemm_config("back_apply", 4096, 4096, torch.bfloat16)
    for bad in ("64,0,64,4,4", f"64,64,64,4,4,0,{utils.MAX_SPLITS + 1}", "64,64,64,4,4,0,-1"):
        monkeypatch.setenv(utils.GEMM_CONFIG_ENVS["project"], bad)
        with pytest.raises(ValueError, match=utils.GEMM_CONFIG_ENVS["project"]):
            utils.gemm_config("project", 512, 4096, torch.bfloat16)


@pytest.mark.parametrize("m, n, rank, side, batch", [
    (4096, 4096, 128, "left", 1), (4096, 4096, 64, "left", 1), (11008, 4096, 128, "right", 1),
    (4096, 4096, 512, "left", 1), (1024, 1024, 256, "left", 96), (2736, 1024, 256, "right", 48),
    (1024, 2736, 256, "left", 24), (256, 256, 8, "left", 1), (33, 65, 8, "right", 2)])
def test_projection_splits_its_reduction_only_while_sms_would_idle(m, n, rank, side, batch):
    programs, steps, per_split, splits = projection_launch(m, n, rank, side, batch=batch)
    assert 1 <= splits <= utils.MAX_SPLITS
    assert (splits - 1) * per_split < steps <= splits * per_split  # every split has work, all of K is covered
    if splits > 1:
        assert per_split >= utils.MIN_SPLIT_STEPS
    # It stops doubling at enough programs, at MAX_SPLITS, or where a further doubling would leave
    # a split fewer than MIN_SPLIT_STEPS steps.
    doubled = 1 << (splits - 1).bit_length()  # the count before "no split left empty" trimmed it
    assert (programs * doubled >= utils.MIN_PROGRAMS or doubled == utils.MAX_SPLITS
            or steps < 2 * doubled * utils.MIN_SPLIT_STEPS), (programs, steps, splits)
    if programs >= utils.MIN_PROGRAMS:
        assert splits == 1  # enough tiles already: one pass, R stored directly


def test_thin_single_matrix_projections_fill_the_gpu():
    """The anchor's rank-128 4096x4096 weight has 128 output tiles alone: split, it fills 132 SMs; the
    368M model's batched buckets have thousands and stay in one pass."""
    for m, n, rank, side in [(4096, 4096, 128, "left"), (4096, 4096, 128, "right"), (2048, 8192, 64, "left")]:
        programs, _, _, splits = projection_launch(m, n, rank, side)
        assert programs < utils.MIN_PROGRAMS <= programs * splits, (m, n, programs, splits)
    assert projection_launch(1024, 1024, 256, "left", batch=96)[3] == 1


def test_fixed_split_counts_never_leave_a_split_empty():
    cfg = utils.GemmConfig(32, 64, 32, 4, 1, split_k=3)
    assert utils.project_splits(cfg, 1, 160) == (2, 3)  # 5 steps: 2 + 2 + 1
    assert utils.project_splits(cfg, 1, 97) == (2, 2)  # 4 steps: 2 + 2, not 2 + 2 + 0
    assert utils.project_splits(utils.GemmConfig(32, 64, 32, 4, 1, split_k=8), 1, 70) == (1, 3)
    assert utils.project_splits(utils.GemmConfig(32, 64, 32, 4, 1, split_k=1), 1, 4096) == (128, 1)


def test_back_projection_loads_its_weight_tile_before_the_gemm_loop(monkeypatch):
    """With GALORE_KERNELS_PREFETCH_W=auto the 16-bit wide tile prefetches W (utils.prefetch_weight):
    its 16-byte loads of W come before the first warpgroup MMA; without the prefetch (the default)
    they follow the loop."""
    cfg = DEVICE_CONFIGS["back_apply"]["wide_16bit"]
    assert not utils.prefetch_weight(cfg, 2)  # off by default: it did not pay on the H200
    monkeypatch.setenv(utils.PREFETCH_ENV, "auto")
    assert utils.prefetch_weight(cfg, 2) and not utils.prefetch_weight(cfg, 4)
    assert not utils.prefetch_weight(utils.GemmConfig(128, 128, 64, 8, 3), 2)  # would halve the CTAs per SM
    assert not utils.prefetch_weight(DEVICE_CONFIGS["back_apply"]["square_fp32"], 4)  # 4 -> 3 CTAs per SM
    sig = BACK_APPLY_SIGNATURE
    first = {}
    for prefetch in (True, False):
        ptx = _ptx(back_apply._back_apply_kernel, sig, dict(
            A_DTYPE=tl.bfloat16, B_DTYPE=tl.bfloat16, W_DTYPE=tl.bfloat16, OPERAND=tl.bfloat16, PRECISION="ieee",
            STOCHASTIC=False, INTERPRETER=False, TMA=False, B_K_MAJOR=False, PREFETCH_W=prefetch, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), tuple(k for k in sig if k != "weight_decay"), cfg.num_warps,
            cfg.num_stages)
        first[prefetch] = (ptx.index("ld.global.v4"), ptx.index("wgmma.mma_async"))
    assert first[True][0] < first[True][1] and first[False][0] > first[False][1], first


def test_prefetch_setting_is_checked(monkeypatch):
    cfg = DEVICE_CONFIGS["back_apply"]["wide_16bit"]
    monkeypatch.setenv(utils.PREFETCH_ENV, "0")
    assert not utils.prefetch_weight(cfg, 2)
    monkeypatch.setenv(utils.PREFETCH_ENV, "yes")
    with pytest.raises(ValueError, match=utils.PREFETCH_ENV):
        utils.prefetch_weight(cfg, 2)


def test_every_launch_pins_floating_point_contraction(monkeypatch):
    """Triton's default for FMA contraction changes in 3.10: each launcher passes it explicitly, so
    a step's bits do not depend on the Triton version. The launches are recorded, not run."""
    from galore_kernels.triton_ops.step import dense_adamw_step_triton, galore_adamw_step_triton
    from triton_parity import HP, make_bucket

    launches = []
    for kernel in (project._lowrank_project_kernel, adam._adam_kernel, back_apply._back_apply_kernel,
                   nonfinite._nonfinite_kernel):
        monkeypatch.setattr(kernel, "run", lambda *args, kernel=kernel, **kwargs: launches.append((kernel, kwargs)))
    b = make_bucket((48, 80), 8, "left", torch.bfloat16, batch=2, steps_before=1, seed=3)
    steps, lr = torch.ones(2, dtype=torch.int32), torch.tensor([0.1])
    galore_adamw_step_triton(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.bases, steps, lr, side="left",
                             weight_decay=0.0, **HP)
    dense_adamw_step_triton(b.params, b.grads, [torch.zeros(48, 80)] * 2, [torch.zeros(48, 80)] * 2, steps, lr,
                            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert {kernel for kernel, _ in launches} == {project._lowrank_project_kernel, adam._adam_kernel,
                                                  back_apply._back_apply_kernel, nonfinite._nonfinite_kernel}
    assert all(kwargs.get("enable_fp_fusion") is utils.FP_FUSION for _, kwargs in launches), launches
