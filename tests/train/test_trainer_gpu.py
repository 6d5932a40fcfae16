"""The bundled trainer on a GPU (skipped without one; benchmarks/gpu_check.sh runs it): GaLore through
the fused Triton step trains the model to the same weights and eval loss as the reference step, with
float32 weights and with bf16 ones, through a refresh and the end-of-epoch evaluation and checkpoint.

Each run is a subprocess with GALORE_KERNELS_BACKEND forcing the step backend: "triton" raises where
the Triton step cannot run, so a run that finishes used it. The four runs go side by side.
"""
import json
import subprocess
import sys

import pytest
import torch

from .conftest import final_weights, subprocess_env, tiny_config, write_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Wider than the CPU tests' tiny model, so that every projected weight is a real kernel launch.
ARCH = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": True}
# Weights after 24 steps, relative to their norm, and the last eval loss, relative. float32: both
# backends run IEEE float32 matmuls (torch's "highest", which the kernels follow); what differs is
# the order of accumulation. bf16: an update that rounds to the other bf16 neighbour now and then.
TOLERANCE = {"fp32": (2e-4, 2e-4), "bf16": (2e-2, 1e-2)}


def start(tmp_path, prepared, backend: str, precision: str):
    """One training run in a subprocess, started (the four runs share the GPU side by side: each
    is small, and a cold Triton cache makes them compile-bound). Returns (output dir, process)."""
    name = f"{backend}-{precision}"
    out = tmp_path / name
    config = tiny_config(out, prepared, model={"architecture": dict(ARCH)},
                         training={"device": "cuda", "precision": precision, "epochs": 2},
                         optimizer={"rank": 16, "update_proj_gap": 10})
    path = write_config(tmp_path / f"{name}.yaml", config)
    env = dict(subprocess_env(), GALORE_KERNELS_BACKEND=backend)
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "galore_train", "--config", str(path)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, text=True)
    return out, process


def finish(tmp_path, out, process):
    """(final weights, summary) of a started run, once it ended well."""
    try:
        returncode = process.wait(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    log = (tmp_path / f"{out.name}.log").read_text()
    assert returncode == 0, f"{out.name} failed:\n{log[-4000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda"), summary["device"]
    return final_weights(out), summary


def test_triton_step_trains_like_the_reference_on_gpu(tmp_path, prepared):
    runs = {(backend, precision): start(tmp_path, prepared, backend, precision)
            for precision in TOLERANCE for backend in ("triton", "reference")}
    results = {key: finish(tmp_path, *run) for key, run in runs.items()}
    for precision, (weights_tol, loss_tol) in TOLERANCE.items():
        triton_weights, triton_summary = results["triton", precision]
        reference_weights, reference_summary = results["reference", precision]
        assert triton_weights.keys() == reference_weights.keys()
        for name, expected in reference_weights.items():
            got = triton_weights[name]
            assert got.dtype == expected.dtype, (precision, name)
            error = float((got.double() - expected.double()).norm() / expected.double().norm())
            assert error <= weights_tol, (precision, name, error)
        losses = [triton_summary["eval_loss_per_epoch"], reference_summary["eval_loss_per_epoch"]]
        assert len(losses[0]) == len(losses[1]) == 2
        assert losses[0][-1] < losses[0][0], (precision, losses)  # it learns
        assert abs(losses[0][-1] - losses[1][-1]) <= loss_tol * losses[1][-1], (precision, losses)
