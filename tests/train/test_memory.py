import json

import pytest
import torch
from torch import nn

from galore_kernels import GaLoreAdamW
from galore_train import memory
from galore_train.memory import MemoryTracker

MB = 1 << 20


def _clear_refs_works() -> bool:
    """Probe independently of the tracker: can this process reset its peak RSS?"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = memory.read_proc_status()
    return status["VmHWM"] - status["VmRSS"] <= memory._RESET_SLACK_BYTES


def test_phases_record_positive_numbers():
    tracker = MemoryTracker(torch.device("cpu"))
    with tracker.phase("setup"):
        x = torch.ones(1000)
    report = tracker.report()
    phase = report["phases"]["setup"]
    assert phase["count"] == 1 and phase["seconds_total"] >= 0
    for key in ("peak_rss_bytes", "rss_at_start_bytes", "rss_at_end_bytes"):
        assert phase[key] > 0, key
    assert phase["peak_rss_bytes"] >= phase["rss_at_start_bytes"]
    del x


def test_per_phase_peak_reset():
    tracker = MemoryTracker("cpu")
    with tracker.phase("big"):
        big = torch.empty(200 * MB, dtype=torch.uint8).fill_(1)  # touched: resident
        del big
    with tracker.phase("small"):
        pass
    report = tracker.report()
    big, small = report["phases"]["big"], report["phases"]["small"]
    assert big["peak_rss_above_start_bytes"] >= 190 * MB
    works = _clear_refs_works()
    assert report["cpu_peak"]["per_phase_reset"] is works
    if works:
        assert big["peak_rss_bytes"] - small["peak_rss_bytes"] > 150 * MB
        assert small["peak_rss_above_start_bytes"] < 50 * MB
        assert "reset at each phase start" in report["cpu_peak"]["note"]
    else:  # the report must say the peaks are since process start
        assert "since process start" in report["cpu_peak"]["note"]
        assert small["peak_rss_bytes"] >= big["peak_rss_bytes"]
    assert report["current"]["peak_rss_since_process_start_bytes"] >= big["peak_rss_bytes"]


def test_repeated_and_nested_phases():
    tracker = MemoryTracker("cpu")
    with tracker.phase("train"):
        for size in (120, 10):
            with tracker.phase("eval"):
                t = torch.empty(size * MB, dtype=torch.uint8).fill_(1)
                del t
    report = tracker.report()
    train, evals = report["phases"]["train"], report["phases"]["eval"]
    assert evals["count"] == 2 and train["count"] == 1
    assert evals["peak_rss_above_start_bytes"] >= 110 * MB  # max over the entries, not the last one
    assert train["peak_rss_bytes"] >= evals["peak_rss_bytes"]  # the outer phase saw the inner peak


def test_phase_recorded_when_body_raises():
    tracker = MemoryTracker("cpu")
    with pytest.raises(ValueError):
        with tracker.phase("boom"):
            raise ValueError("x")
    assert tracker.report()["phases"]["boom"]["count"] == 1
    assert tracker.report()["open_phases"] == []


def _nbytes(*shapes, itemsize=4):
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n * itemsize
    return total


def test_record_tensors_galore_classification():
    torch.manual_seed(0)
    m, n, r = 8, 16, 4
    lin = nn.Linear(n, m)  # weight (m, n) with m < n: std projection is on the left
    opt = GaLoreAdamW([{"params": [lin.weight], "rank": r}, {"params": [lin.bias]}], lr=1e-3)
    lin(torch.randn(3, n)).sum().backward()
    opt.step()
    w_state = opt.state[lin.weight]
    assert "proj_left" in w_state and "proj_right" not in w_state

    tracker = MemoryTracker("cpu")
    tracker.record_tensors(lin, opt)
    tensors = tracker.report()["tensors"]
    state = tensors["optimizer_state"]
    assert state["galore_projection"]["bytes"] == _nbytes((m, r))  # P: (m, r) float32
    assert state["galore_moments"]["bytes"] == _nbytes((r, n), (r, n))  # exp_avg, exp_avg_sq of P^T G
    assert state["adam_moments"]["bytes"] == _nbytes((m,), (m,))  # the bias's full moments
    assert state["other"]["bytes"] == 0
    assert tensors["full_rank_adam_moments_bytes"] == 2 * 4 * (m * n + m)
    assert tensors["saving_vs_full_rank_adam_bytes"] == (
        2 * 4 * (m * n + m) - _nbytes((m, r), (r, n), (r, n), (m,), (m,))
    )
    params = tensors["parameters"]
    assert params["trainable"]["bytes"] == _nbytes((m, n), (m,))
    assert params["trainable"]["by_dtype"] == {"float32": _nbytes((m, n), (m,))}
    assert params["frozen"]["bytes"] == 0
    assert tensors["gradients"]["bytes"] == _nbytes((m, n), (m,))

    # Wrapper objects with .optimizer (the layer-wise handle) and lists give the same numbers.
    class Handle:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    for wrapped in (Handle(opt), [opt], [Handle(opt)]):
        tracker.record_tensors(lin, wrapped, grads=False)
        again = tracker.report()["tensors"]
        assert again["optimizer_state"] == state
        assert again["gradients"] is None


def test_bf16_state_dtype_halves_the_recorded_moments():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    held = {}
    for state_dtype in ("float32", "bfloat16"):
        opt = GaLoreAdamW([{"params": [lin.weight], "rank": 4}, {"params": [lin.bias]}], lr=1e-3,
                          state_dtype=state_dtype)
        lin.zero_grad()
        lin(torch.randn(3, 16)).sum().backward()
        opt.step()
        tracker = MemoryTracker("cpu")
        tracker.record_tensors(lin, opt)
        held[state_dtype] = tracker.report()["tensors"]["optimizer_state"]
    for category in ("galore_moments", "adam_moments"):
        assert held["bfloat16"][category]["bytes"] * 2 == held["float32"][category]["bytes"] > 0
    assert held["bfloat16"]["galore_projection"] == held["float32"]["galore_projection"]  # bases stay float32


def test_record_tensors_adamw_tied_and_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight
            self.frozen = nn.Linear(6, 6).to(torch.bfloat16).requires_grad_(False)

    model = Tied()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.head(model.emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    tracker = MemoryTracker("cpu")
    tracker.record_tensors(model, opt)
    tensors = tracker.report()["tensors"]
    assert tensors["parameters"]["trainable"]["bytes"] == _nbytes((10, 6))  # tied: counted once
    assert tensors["parameters"]["frozen"]["by_dtype"] == {"bfloat16": _nbytes((6, 6), (6,), itemsize=2)}
    assert tensors["gradients"]["bytes"] == _nbytes((10, 6))
    assert tensors["optimizer_state"]["adam_moments"]["bytes"] == _nbytes((10, 6), (10, 6))
    assert tensors["optimizer_state"]["galore_moments"]["bytes"] == 0
    assert tensors["optimizer_state"]["other"]["bytes"] == _nbytes(())  # AdamW's step tensor
    assert tensors["full_rank_adam_moments_bytes"] == 2 * 4 * 60


def test_report_without_phases_and_write(tmp_path):
    tracker = MemoryTracker(torch.device("cpu"))
    report = tracker.report()
    assert report["phases"] == {}
    assert report["device"] == "cpu" and report["torch_version"] == torch.__version__
    assert report["timestamp"] and report["tensors"] == {"recorded": False}
    assert report["current"]["rss_bytes"] > 0 and report["current"]["peak_rss_since_process_start_bytes"] > 0

    out = tmp_path / "sub" / "memory.json"
    tracker.write(out)
    loaded = json.loads(out.read_text())
    assert loaded["device"] == "cpu" and loaded["phases"] == {}
    assert out.read_text().startswith('{\n  "')  # indent 2
    assert [p.name for p in out.parent.iterdir()] == ["memory.json"]  # no temporary left behind

    with tracker.phase("x"):
        pass
    tracker.write(out)  # replaces atomically
    assert "x" in json.loads(out.read_text())["phases"]
