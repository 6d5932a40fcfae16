"""Ahead-of-time compilation of every Triton kernel variant the launchers can pick, for sm_90.

The interpreter (tests/triton_interp) accepts kernels the compiler rejects (dot shapes, layouts,
dtype rules), and CI has no GPU: ``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` runs the whole
compiler down to a cubin here. The precision mapping of float32 matmuls is checked beside it.
"""
import itertools
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled
    pytest.skip("ahead-of-time compilation needs compiled (not interpreted) kernels: unset TRITON_INTERPRET",
                allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from galore_kernels.triton_ops import adam, back_apply, nonfinite, project, utils  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DEVICE_CONFIGS = {name: cfg for name, cfg in utils.GEMM_CONFIGS.items() if name != "interpreter"}
TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_kernel(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(compiled.asm["cubin"]) > 0
    return compiled


def gemm_variants():
    """(config name, operand dtype, fp32 precision) as gemm_config/dot_precision can return them."""
    for name, cfg in DEVICE_CONFIGS.items():
        dtypes = [torch.float32] if name.endswith("fp32") else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            for precision in (sorted(set(utils.FP32_PRECISION.values())) if dtype == torch.float32 else ["ieee"]):
                yield name, dtype, precision


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("config, dtype, precision", list(gemm_variants()))
def test_project_kernel_compiles(side, config, dtype, precision):
    cfg = DEVICE_CONFIGS[config]
    a_dtype, b_dtype = (torch.float32, dtype) if side == "left" else (dtype, torch.float32)
    signature = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
                 **{k: "i32" for k in ("out_batch_stride", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn")}}
    compile_kernel(project._lowrank_project_kernel, signature, dict(
        A_DTYPE=utils.TORCH_TO_TL[a_dtype], B_DTYPE=utils.TORCH_TO_TL[b_dtype], OPERAND=utils.TORCH_TO_TL[dtype],
        PRECISION=precision, INTERPRETER=False, RANK_ON_M=side == "left", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)


@pytest.mark.parametrize("config, dtype, precision", list(gemm_variants()))
def test_back_apply_kernel_compiles(config, dtype, precision):
    cfg = DEVICE_CONFIGS[config]
    signature = {"a_table": "*i64", "b_table": "*i64", "w_table": "*i64", "lr_ptr": "*fp32", "nonfinite_ptr": "*i32",
                 "M": "i32", "N": "i32", "K": "i32", "weight_decay": "fp32"}
    compile_kernel(back_apply._back_apply_kernel, signature, dict(
        W_DTYPE=utils.TORCH_TO_TL[dtype], OPERAND=utils.TORCH_TO_TL[dtype], PRECISION=precision, INTERPRETER=False,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)


ADAM_VARIANTS = [(False, torch.float32, bias) for bias in (True, False)] + [
    (True, dtype, bias) for dtype in utils.SUPPORTED_DTYPES for bias in (True, False)]


@pytest.mark.parametrize("dense, dtype, correct_bias", ADAM_VARIANTS)
def test_adam_kernel_compiles(dense, dtype, correct_bias):
    signature = {"grad_table": "*i64", "exp_avg_table": "*i64", "exp_avg_sq_table": "*i64", "out_table": "*i64",
                 "steps_ptr": "*i32", "lr_ptr": "*fp32", "nonfinite_ptr": "*i32", "numel": "i32",
                 **{k: "fp32" for k in ("beta1", "beta2", "log_beta1", "log_beta2", "eps", "weight_decay", "scale")}}
    compile_kernel(adam._adam_kernel, signature, dict(
        GRAD_DTYPE=utils.TORCH_TO_TL[dtype], OUT_DTYPE=utils.TORCH_TO_TL[dtype], DENSE=dense,
        CORRECT_BIAS=correct_bias, INTERPRETER=False, BLOCK=utils.ELEMENTWISE_BLOCK), utils.ELEMENTWISE_WARPS)


@pytest.mark.parametrize("dtype", utils.SUPPORTED_DTYPES)
def test_nonfinite_kernel_compiles(dtype):
    compile_kernel(nonfinite._nonfinite_kernel, {"table": "*i64", "nonfinite_ptr": "*i32", "numel": "i32"},
                   dict(DTYPE=utils.TORCH_TO_TL[dtype], BLOCK=utils.ELEMENTWISE_BLOCK), utils.ELEMENTWISE_WARPS)


@pytest.mark.parametrize("operand, precision, tensor_cores", [
    (torch.bfloat16, "ieee", True), (torch.float32, "tf32", True), (torch.float32, "ieee", False)])
def test_matrix_instructions_follow_precision(operand, precision, tensor_cores):
    """bf16 and TF32 projections issue Hopper's warpgroup MMA (wgmma); IEEE float32 must not touch
    the tensor cores (it would silently be TF32), so it is plain FMA."""
    cfg = DEVICE_CONFIGS["wide_16bit" if operand != torch.float32 else "wide_fp32"]
    signature = {"a_table": "*i64", "b_table": "*i64", "out_ptr": "*fp32", "nonfinite_ptr": "*i32",
                 **{k: "i32" for k in ("out_batch_stride", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn")}}
    compiled = compile_kernel(project._lowrank_project_kernel, signature, dict(
        A_DTYPE=tl.float32, B_DTYPE=utils.TORCH_TO_TL[operand], OPERAND=utils.TORCH_TO_TL[operand],
        PRECISION=precision, INTERPRETER=False, RANK_ON_M=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k), cfg.num_warps, cfg.num_stages)
    ptx = compiled.asm["ptx"]
    assert ("wgmma" in ptx) == tensor_cores and "mma.sync" not in ptx
    assert tensor_cores or "fma.rn.f32" in ptx


def test_launchers_pick_only_compiled_configs():
    shapes = [(m, n) for m, n in itertools.product([8, 64, 512, 1024, 4096, 11008], repeat=2)]
    for (m, n), dtype, batch in itertools.product(shapes, utils.SUPPORTED_DTYPES, [1, 4, 96]):
        assert utils.gemm_config(m, n, dtype, batch) in DEVICE_CONFIGS.values()


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_matmul_precision_follows_torch(setting, expected):
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert utils.dot_precision(torch.float32) == expected
        assert utils.dot_precision(torch.bfloat16) == "ieee"  # 16-bit operands: the flag is unused
    finally:
        torch.set_float32_matmul_precision(previous)
