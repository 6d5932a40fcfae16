"""route_parameters: which parameters GaLore, AdamW or nobody updates, and the printed table."""
from __future__ import annotations

import re

import pytest
from galore_train.modeling import build_model, is_quantized_module
from galore_train.routing import RoutingError, RoutingTable, route_parameters

from .conftest import CPU, VOCAB, make_config

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny(**sections):
    config = make_config(**sections)
    return build_model(config, vocab_size=VOCAB, device=CPU), config


def projection_weights(n_layers: int = 2) -> set[str]:
    parts = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    return {f"model.layers.{i}.{parts[p]}.{p}.weight" for i in range(n_layers) for p in PROJECTIONS}


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    model, _ = tiny()
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def int8_model(saved_tiny):
    config = make_config(model={"name_or_path": str(saved_tiny)}, quantization={"enabled": True})
    return build_model(config, vocab_size=VOCAB, device=CPU), config


def by_name(table: RoutingTable) -> dict:
    return {r.name: r for r in table.routes}


def check_partition(model, table: RoutingTable) -> None:
    """The routes cover each unique parameter once; the param lists follow named_parameters order."""
    named = list(model.named_parameters())
    assert [r.name for r in table.routes] == [n for n, _ in named]
    trainable = [p for _, p in named if p.requires_grad]
    counts = table.counts()
    assert counts["galore"]["tensors"] + counts["adamw"]["tensors"] == len(trainable)
    assert sum(c["tensors"] for c in counts.values()) == len(named)
    assert sum(c["elements"] for c in counts.values()) == sum(p.numel() for _, p in named)
    galore, adamw = table.galore_params(model), table.adamw_params(model)
    assert {id(p) for p in galore}.isdisjoint(id(p) for p in adamw)
    order = {id(p): i for i, (_, p) in enumerate(named)}
    for group in (galore, adamw):
        assert [order[id(p)] for p in group] == sorted(order[id(p)] for p in group)
    assert {id(p) for p in galore + adamw} == {id(p) for p in trainable}


def test_plain_tied_model_all_linear():
    model, config = tiny()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = route_parameters(model, config)
    routes = by_name(table)
    assert table.optimizer_type == "galore" and table.fallback_note is None
    galore = {n for n, r in routes.items() if r.decision == "galore"}
    assert galore == projection_weights()
    assert all(r.reason == "2-D Linear weight matched by target_modules" for n, r in routes.items() if n in galore)
    # The tied head appears once, under the embedding's name, with the tie noted.
    assert "lm_head.weight" not in routes
    embed = routes["model.embed_tokens.weight"]
    assert embed.decision == "adamw" and embed.reason.startswith("embedding") and "lm_head.weight" in embed.reason
    for name, route in routes.items():
        if "norm" in name:
            assert (route.decision, route.reason) == ("adamw", "norm")
        if name.endswith(".bias"):
            assert (route.decision, route.reason) == ("adamw", "bias")
    assert not any(r.decision == "frozen" for r in table.routes)
    counts = table.counts()
    assert counts["galore"]["tensors"] == 14
    assert counts["galore"]["tensors"] + counts["adamw"]["tensors"] == len(list(model.parameters()))
    check_partition(model, table)


def test_untied_head_is_adamw_with_all_linear_reason():
    model, config = tiny(model={"architecture": {"tie_word_embeddings": False}})
    table = route_parameters(model, config)
    head = by_name(table)["lm_head.weight"]
    assert (head.decision, head.reason) == ("adamw", "output head (excluded by all-linear)")
    check_partition(model, table)


def test_layerwise_routes_like_galore_and_adamw_routes_nothing_to_galore():
    model, config = tiny(optimizer={"type": "galore_layerwise"})
    table = route_parameters(model, config)
    assert table.optimizer_type == "galore_layerwise"
    assert {r.name for r in table.routes if r.decision == "galore"} == projection_weights()
    for kind in ("adamw", "adamw8bit"):
        config = make_config(optimizer={"type": kind})
        table = route_parameters(model, config)
        assert table.optimizer_type == kind and table.fallback_note is None
        assert table.counts()["galore"]["tensors"] == 0
        assert len(table.adamw_params(model)) == len(list(model.parameters()))
        q = by_name(table)["model.layers.0.self_attn.q_proj.weight"]
        assert q.decision == "adamw" and f"optimizer.type={kind}" in q.reason


def test_target_module_list_selects_only_those():
    model, config = tiny(optimizer={"target_modules": ["q_proj", "v_proj"]})
    table = route_parameters(model, config)
    galore = {r.name for r in table.routes if r.decision == "galore"}
    assert galore == {n for n in projection_weights() if ".q_proj." in n or ".v_proj." in n}
    k = by_name(table)["model.layers.0.self_attn.k_proj.weight"]
    assert (k.decision, k.reason) == ("adamw", "Linear weight not matched by target_modules")
    check_partition(model, table)


@pytest.mark.parametrize("source", ["folder", "embedded default"])
def test_int8_model_freezes_base_weights_and_falls_back(source, int8_model):
    if source == "folder":
        model, config = int8_model
    else:  # the embedded default goes through the same quantized from_pretrained path
        config = make_config(quantization={"enabled": True})
        model = build_model(config, vocab_size=VOCAB, device=CPU)
    assert any(is_quantized_module(m) for m in model.modules())
    table = route_parameters(model, config)
    routes = by_name(table)
    frozen = {n for n, r in routes.items() if r.decision == "frozen"}
    assert frozen == projection_weights()
    for name in frozen:
        assert routes[name].reason == "int8 quantized base weight (bitsandbytes)"
        assert routes[name].dtype == "int8"
    assert table.counts()["galore"]["tensors"] == 0
    assert table.optimizer_type == "adamw"
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert table.fallback_note is not None
    assert "no weight is GaLore-eligible" in table.fallback_note and "int8-quantized" in table.fallback_note
    assert f"falling back to AdamW for the {n_trainable} trainable tensors" in table.fallback_note
    # Embeddings (tied to the float head), norms and biases stay float and trainable.
    assert not is_quantized_module(model.lm_head)
    for name, route in routes.items():
        if name not in frozen:
            assert route.decision == "adamw" and route.dtype == "float32"
    assert routes["model.embed_tokens.weight"].reason.startswith("embedding")
    check_partition(model, table)


def test_no_eligible_weight_falls_back_to_adamw():
    model, config = tiny(optimizer={"target_modules": r".*layernorm"})
    table = route_parameters(model, config)
    assert table.optimizer_type == "adamw"
    assert table.counts()["galore"]["tensors"] == 0
    assert table.counts()["adamw"]["tensors"] == len(list(model.parameters()))
    assert "optimizer.type=galore but no weight is GaLore-eligible" in table.fallback_note
    assert "matched no nn.Linear module" in table.fallback_note
    # A literal name that matches only norms: reported as matched but not a Linear.
    model, config = tiny(optimizer={"target_modules": ["input_layernorm"]})
    table = route_parameters(model, config)
    assert table.optimizer_type == "adamw" and "cannot be projected" in table.fallback_note
    norm = by_name(table)["model.layers.0.input_layernorm.weight"]
    assert norm.decision == "adamw" and norm.reason.startswith("matched but not an nn.Linear")


def test_nothing_trainable_raises_with_fix():
    model, config = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(RoutingError, match="no parameter of the model is trainable"):
        route_parameters(model, config)


def test_frozen_float_weight_is_frozen_not_galore():
    model, config = tiny()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    table = route_parameters(model, config)
    route = by_name(table)["model.layers.1.mlp.up_proj.weight"]
    assert (route.decision, route.reason) == ("frozen", "requires_grad=False")
    check_partition(model, table)


def test_invalid_target_modules_names_the_key():
    model, config = tiny(optimizer={"target_modules": "q_proj("})
    with pytest.raises(RoutingError, match=r"optimizer\.target_modules"):
        route_parameters(model, config)


def test_format_is_a_compact_table():
    model, config = tiny()
    table = route_parameters(model, config)
    text = table.format()
    lines = text.splitlines()
    assert re.match(r"name\s+shape\s+dtype\s+route\s+reason$", lines[1])
    assert "optimizer: galore" in lines[0]
    # Two layers with identical routing: one row per projection, the index replaced by *.
    assert re.search(r"^model\.layers\.\*\.self_attn\.q_proj\.weight\s+x2\s+32x32\s+float32\s+galore\s+"
                     r"2-D Linear weight matched by target_modules$", text, re.M)
    assert "model.layers.0." not in text and "model.layers.1." not in text
    assert "totals: galore 14 tensors" in lines[-1]
    # embedding + 12 grouped rows (7 weights, 3 biases, 2 norms) + final norm; title, header, rule, totals.
    assert len(lines) == 4 + 1 + 12 + 1
    # A layer that differs is listed on its own; the others keep their group with explicit indices.
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    text = route_parameters(model, config).format()
    assert re.search(r"^model\.layers\.1\.mlp\.up_proj\.weight\s+64x32\s+float32\s+frozen\s+requires_grad=False$",
                     text, re.M)
    assert re.search(r"^model\.layers\.0\.mlp\.up_proj\.weight\s+64x32\s+float32\s+galore", text, re.M)
    # With more layers the rest of the pattern keeps one row, its indices listed.
    model, config = tiny(model={"architecture": {"num_hidden_layers": 4}})
    model.model.layers[2].mlp.up_proj.weight.requires_grad_(False)
    text = route_parameters(model, config).format()
    assert re.search(r"^model\.layers\.\{0-1,3\}\.mlp\.up_proj\.weight\s+x3\s+64x32\s+float32\s+galore", text, re.M)


def test_format_after_fallback_shows_requested_type(int8_model):
    model, config = int8_model
    text = route_parameters(model, config).format()
    assert "optimizer: adamw, requested galore" in text.splitlines()[0]
    assert re.search(r"model\.layers\.\*\.mlp\.down_proj\.weight\s+x2\s+32x64\s+int8\s+frozen", text)


@pytest.mark.parametrize("kind", ["galore", "galore_layerwise", "adamw"])
def test_state_dtype_and_rounding_reach_every_group_of_the_built_optimizer(kind):
    from galore_train.optim import build_optimizer

    model, config = tiny(optimizer={"type": kind, "state_dtype": "bfloat16", "stochastic_rounding": True})
    bundle = build_optimizer(model, route_parameters(model, config), config, total_steps=10)
    groups = bundle.optimizer.param_groups
    assert [(g["state_dtype"], g["stochastic_rounding"]) for g in groups] == [("bfloat16", True)] * len(groups)
    if bundle.layerwise is not None:
        bundle.layerwise.remove()
