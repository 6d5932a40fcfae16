"""Tests for galore_kernels.param_groups: module matching, eligibility and group building."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from galore_kernels.param_groups import galore_param_groups, match_galore_modules

LOGGER = "galore_kernels"
HEAD_REASON = "output head (get_output_embeddings), excluded by 'all-linear'"


# ---------------------------------------------------------------------------------------------
# small models
# ---------------------------------------------------------------------------------------------


class Attn(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)


class Mlp(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.attn = Attn(d)
        self.mlp = Mlp(d)
        self.norm = nn.LayerNorm(d)


class Toy(nn.Module):
    """embed -> 2 blocks -> head; no get_output_embeddings, so 'all-linear' keeps the head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 16, bias=False)


def selected_names(model: nn.Module, target) -> list[str]:
    return [name for name, _ in match_galore_modules(model, target)[0]]


def tiny_qwen2():
    import transformers
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config)


def unique_trainable(model: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in model.parameters() if p.requires_grad}


def group_ids(groups: list[dict]) -> list[int]:
    return [id(p) for g in groups for p in g["params"]]


# ---------------------------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------------------------


def test_list_exact_name():
    assert selected_names(Toy(), ["blocks.0.attn.q_proj"]) == ["blocks.0.attn.q_proj"]


def test_list_substring():
    assert selected_names(Toy(), ["q_proj", "v_proj"]) == [
        "blocks.0.attn.q_proj",
        "blocks.0.attn.v_proj",
        "blocks.1.attn.q_proj",
        "blocks.1.attn.v_proj",
    ]


def test_list_regex_entry_must_fullmatch():
    # Neither a name nor a substring (it contains backslashes): only the regex rule can match.
    assert selected_names(Toy(), [r"blocks\.1\.mlp\.(up|down)"]) == ["blocks.1.mlp.up", "blocks.1.mlp.down"]
    # A regex that only matches a prefix selects nothing.
    assert selected_names(Toy(), [r"blocks\.1\.mlp\.u"]) == []


def test_single_string_is_fullmatch_regex():
    model = Toy()
    assert selected_names(model, r".*\.mlp\..*") == [
        "blocks.0.mlp.up",
        "blocks.0.mlp.down",
        "blocks.1.mlp.up",
        "blocks.1.mlp.down",
    ]
    # A single string is not a substring match, unlike a list entry.
    assert selected_names(model, "q_proj") == []
    assert len(selected_names(model, ["q_proj"])) == 2


def test_regex_match_of_containers_is_not_reported():
    selected, left_out = match_galore_modules(Toy(), r".*attn.*")
    assert len(selected) == 8
    # blocks.N.attn (an Attn container) matches the regex but is not reported, like transformers.
    assert left_out == []


def test_non_linear_literal_match_is_reported():
    selected, left_out = match_galore_modules(Toy(), ["embed", "q_proj"])
    assert len(selected) == 2
    assert left_out == [("embed", "not an nn.Linear (Embedding)")]


def test_single_string_equal_to_name_reports_non_linear():
    # transformers treats a single string equal to the name as a literal (non-regex) match.
    _, left_out = match_galore_modules(Toy(), "blocks.0.norm")
    assert left_out == [("blocks.0.norm", "not an nn.Linear (LayerNorm)")]


def test_linear_subclass_is_selected():
    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4), nn.ReLU())
    assert selected_names(model, "all-linear") == ["0"]


# ---------------------------------------------------------------------------------------------
# all-linear, tied weights, group contents
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["all-linear", "all_linear"])
def test_all_linear_qwen2_tied_head(spelling, caplog):
    model = tiny_qwen2()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # really tied
    with caplog.at_level(logging.INFO, logger=LOGGER):
        groups = galore_param_groups(model, spelling, rank=4)
    selected, left_out = match_galore_modules(model, spelling)

    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in selected] == [n for n in linear_names if n != "lm_head"]
    assert len(selected) == 2 * 7
    assert left_out == [("lm_head", HEAD_REASON)]

    galore, plain = groups
    # Every unique trainable parameter appears exactly once across the groups.
    ids = group_ids(groups)
    assert len(ids) == len(set(ids)) == len(unique_trainable(model))
    tied = model.lm_head.weight
    assert any(p is tied for p in plain["params"])
    assert not any(p is tied for p in galore["params"])
    assert all(p.dim() == 2 for p in galore["params"])
    assert len(galore["params"]) == 14

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "lm_head" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("14" in msg for msg in infos)


def test_all_linear_excludes_linear_sharing_head_weight():
    class WithHead(Toy):
        def __init__(self) -> None:
            super().__init__()
            self.alias = nn.Linear(8, 16, bias=False)
            self.alias.weight = self.head.weight

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    model = WithHead()
    selected, left_out = match_galore_modules(model, "all-linear")
    names = [n for n, _ in selected]
    assert "head" not in names and "alias" not in names
    reasons = dict(left_out)
    assert reasons["head"] == HEAD_REASON
    assert reasons["alias"] == "shares its weight with the output head 'head', excluded by 'all-linear'"


def test_get_output_embeddings_returning_none_keeps_all_linears():
    class NoHead(Toy):
        def get_output_embeddings(self):
            return None

    assert "head" in selected_names(NoHead(), "all-linear")


def test_weight_shared_by_two_selected_linears_counted_once():
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b, nn.LayerNorm(4))
    groups = galore_param_groups(model, "all-linear", rank=2)
    assert [len(g["params"]) for g in groups] == [1, 2]
    assert groups[0]["params"][0] is a.weight


def test_groups_follow_named_parameters_order():
    model = Toy()
    galore, plain = galore_param_groups(model, ["up", "q_proj", "down"], rank=2)
    order = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    for group in (galore, plain):
        positions = [order[id(p)] for p in group["params"]]
        assert positions == sorted(positions)
    expected = [m.weight for n, m in model.named_modules() if n.endswith(("up", "q_proj", "down"))]
    assert [id(p) for p in galore["params"]] == [id(p) for p in expected]


def test_empty_plain_group_is_dropped_and_optimizer_accepts_groups():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    groups = galore_param_groups(model, "all-linear", rank=2)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2
    torch.optim.AdamW(galore_param_groups(Toy(), ["q_proj"], rank=2), lr=1e-3)


def test_kw_passthrough_lands_in_galore_group():
    galore, plain = galore_param_groups(
        Toy(), ["q_proj"], rank=3, update_proj_gap=7, scale=0.5, proj_type="left", svd="exact"
    )
    assert galore["svd"] == "exact"
    assert (galore["rank"], galore["update_proj_gap"], galore["scale"], galore["proj_type"]) == (3, 7, 0.5, "left")
    assert set(plain) == {"params"}


# ---------------------------------------------------------------------------------------------
# left-out layers: frozen, quantized, non-2-D
# ---------------------------------------------------------------------------------------------


def test_frozen_linear_left_out_and_in_no_group(caplog):
    model = Toy()
    frozen = model.blocks[0].attn.q_proj
    frozen.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        groups = galore_param_groups(model, ["q_proj"], rank=2)
    assert selected_names(model, ["q_proj"]) == ["blocks.1.attn.q_proj"]
    ids = group_ids(groups)
    assert id(frozen.weight) not in ids and id(frozen.bias) not in ids
    assert len(ids) == len(unique_trainable(model))
    assert "blocks.0.attn.q_proj: frozen" in caplog.text


def test_conv_and_3d_weights_never_selected():
    class Linear3D(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.weight = nn.Parameter(torch.zeros(2, 4, 4))

    model = nn.Sequential(nn.Conv1d(4, 4, 3), Linear3D(), nn.Linear(4, 4))
    assert selected_names(model, "all-linear") == ["2"]
    selected, left_out = match_galore_modules(model, ["0", "1"])
    assert selected == []
    reasons = dict(left_out)
    assert reasons["0"] == "not an nn.Linear (Conv1d)"
    assert "3-D" in reasons["1"]


class FakeInt8Linear(nn.Linear):
    """A quantized-looking layer that does not come from bitsandbytes."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


def test_fake_int8_linear_is_quantized(caplog):
    model = nn.Sequential(FakeInt8Linear(), nn.Linear(4, 4))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        galore, plain = galore_param_groups(model, "all-linear", rank=2)
    assert galore["params"] == [model[1].weight]
    assert not any(p is model[0].weight for p in plain["params"])
    reasons = dict(match_galore_modules(model, "all-linear")[1])
    assert "quantized" in reasons["0"] and "int8" in reasons["0"]
    assert "0: quantized" in caplog.text


def test_quant_state_attribute_marks_float_weight_quantized():
    layer = nn.Linear(4, 4)
    layer.weight.quant_state = object()  # what Params4bit carries, even while still float
    _, left_out = match_galore_modules(nn.Sequential(layer), "all-linear")
    assert left_out == [("0", "quantized (weight has a quant_state attribute)")]


@pytest.mark.parametrize("quantize", [True, False], ids=["quantized", "constructed"])
def test_bitsandbytes_layers_left_out(quantize, caplog):
    import bitsandbytes as bnb
    model = nn.Sequential(
        bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False),
        bnb.nn.Linear4bit(16, 16),
        nn.Linear(16, 16),
    )
    if quantize:
        model = model.to("cpu")  # bitsandbytes quantizes Int8Params/Params4bit on .to(device)
        assert model[0].weight.dtype == torch.int8 and model[1].weight.dtype == torch.uint8
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        groups = galore_param_groups(model, "all-linear", rank=2)
    assert groups[0]["params"] == [model[2].weight]
    assert id(model[0].weight) not in group_ids(groups)
    assert id(model[1].weight) not in group_ids(groups)
    reasons = dict(match_galore_modules(model, "all-linear")[1])
    assert reasons["0"] == "quantized by bitsandbytes (Linear8bitLt)"
    assert reasons["1"] == "quantized by bitsandbytes (Linear4bit)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "0: quantized by bitsandbytes" in warnings[0] and "1: quantized by bitsandbytes" in warnings[0]


def test_only_quantized_matches_raise_with_reasons():
    with pytest.raises(ValueError, match="target_modules.*none can be projected.*quantized"):
        galore_param_groups(nn.Sequential(FakeInt8Linear()), "all-linear")


def test_no_warning_when_nothing_left_out(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        galore_param_groups(Toy(), ["q_proj"], rank=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("GaLore projects 2 weight(s)" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2.0}, "rank"),
        ({"rank": True}, "rank"),
        ({"update_proj_gap": 0}, "update_proj_gap"),
        ({"scale": -1.0}, "scale"),
        ({"proj_type": "diagonal"}, "proj_type"),
    ],
)
def test_bad_hyperparameters(kwargs, word):
    with pytest.raises(ValueError, match=word):
        galore_param_groups(Toy(), ["q_proj"], **kwargs)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (None, TypeError),
        (123, TypeError),
        ({"q_proj"}, TypeError),
        (["q_proj", 5], TypeError),
        ([], ValueError),
        ("", ValueError),
        ([""], ValueError),
        ("(", ValueError),
        (["q_proj", "lin[ear"], ValueError),
    ],
)
def test_bad_target_modules(target, error):
    with pytest.raises(error, match="target_modules") as info:
        galore_param_groups(Toy(), target)
    assert "q_proj" in str(info.value) or "all-linear" in str(info.value)  # shows an example
    with pytest.raises(error, match="target_modules"):
        match_galore_modules(Toy(), target)


def test_nothing_matched_lists_linear_names():
    with pytest.raises(ValueError, match="target_modules") as info:
        galore_param_groups(Toy(), ["nonexistent"])
    message = str(info.value)
    assert "matched no module" in message
    assert "blocks.0.attn.q_proj" in message


def test_params_in_kw_rejected():
    with pytest.raises(TypeError, match="params"):
        galore_param_groups(Toy(), ["q_proj"], params=[])
