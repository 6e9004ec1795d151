"""EAGLE heads: checkpoints in SafeAILab / SpecForge layouts load and compute what their tensors say (checked against a
plain-torch reference), our own save/load round-trips, KV/tree semantics equal a full forward, bad files fail clearly."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from nanospec_core.errors import NanoSpecError
from nanospec_core.models.eagle import Eagle2Head, Eagle3Head, default_aux_layers, random_head
from nanospec_core.models.eagle_checkpoint import load_head, save_head
from nanospec_core.models.eagle_checkpoint import aux_layers_from
from nanospec_core.models.target import TargetModel
from tests.conftest import tiny_hf_model, tree_example

VOCAB, H, HEADS, KV_HEADS, HEAD_DIM = 4096, 64, 4, 2, 16
FFN = 96  # differs from the target's 128: the checkpoint's config must decide
THETA, EPS = 50000.0, 1e-5  # differ from the targets' defaults for the same reason
DRAFT_VOCAB = 1024


def rand(*shape, scale=0.15):
    return torch.randn(*shape) * scale


def layer_tensors(prefix: str, in_width: int, qkv_bias: bool = False) -> dict:
    state = {
        prefix + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, in_width),
        prefix + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, in_width),
        prefix + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, in_width),
        prefix + "self_attn.o_proj.weight": rand(H, HEADS * HEAD_DIM),
        prefix + "mlp.gate_proj.weight": rand(FFN, H),
        prefix + "mlp.up_proj.weight": rand(FFN, H),
        prefix + "mlp.down_proj.weight": rand(H, FFN),
        prefix + "post_attention_layernorm.weight": 1 + rand(H),
    }
    if qkv_bias:
        for name, rows in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS)):
            state[f"{prefix}self_attn.{name}.bias"] = rand(rows * HEAD_DIM)
    return state


def llama_config(**extra) -> dict:
    return {"model_type": "llama", "hidden_size": H, "intermediate_size": FFN, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "num_hidden_layers": 1, "hidden_act": "silu", "rms_norm_eps": EPS,
            "rope_theta": THETA, "rope_scaling": None, "max_position_embeddings": 2048, "vocab_size": VOCAB,
            "torch_dtype": "float16", **extra}


def eagle2_checkpoint(qkv_bias: bool = False, fc_bias: bool = True):
    """SafeAILab EAGLE-1/2 layout (cnets1.py), including the embedding copy it ships."""
    state = {"fc.weight": rand(H, 2 * H), "embed_tokens.weight": rand(VOCAB, H, scale=1.0),
             **layer_tensors("layers.0.", H, qkv_bias)}
    if fc_bias:
        state["fc.bias"] = rand(H)
    return llama_config(architectures=["LlamaForCausalLM"], bias=fc_bias), state


def eagle3_checkpoint(layout: str):
    """EAGLE-3 with a 1024-token draft vocabulary; SafeAILab ships no embeddings, SpecForge does."""
    draft_ids = torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[draft_ids] = True
    state = {"fc.weight": rand(H, 3 * H), "norm.weight": 1 + rand(H), "lm_head.weight": rand(DRAFT_VOCAB, H),
             "d2t": draft_ids - torch.arange(DRAFT_VOCAB), "t2d": t2d,
             "midlayer.input_layernorm.weight": 1 + rand(H), "midlayer.hidden_norm.weight": 1 + rand(H),
             **layer_tensors("midlayer.", 2 * H)}
    if layout == "specforge":
        state["embed_tokens.weight"] = rand(VOCAB, H, scale=1.0)
    config = llama_config(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
    return config, state, draft_ids


def write(folder, config: dict, state: dict, fmt: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return str(folder)


# ---- an independent reference: the maths of the heads in plain torch ops --------------------------------------
def rms_norm(x, weight):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def linear(x, state, name):
    y = x @ state[name + ".weight"].T
    return y + state[name + ".bias"] if name + ".bias" in state else y


def rope(x, theta):  # x [n, heads, d] at positions 0..n-1: rotate the pairs (i, i + d/2)
    d = x.shape[-1]
    angle = torch.arange(x.shape[0]).float()[:, None] / theta ** (torch.arange(0, d, 2).float() / d)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_attention(x, state, prefix):
    n = x.shape[0]
    q = rope(linear(x, state, prefix + "q_proj").view(n, HEADS, HEAD_DIM), THETA)
    k = rope(linear(x, state, prefix + "k_proj").view(n, KV_HEADS, HEAD_DIM), THETA)
    v = linear(x, state, prefix + "v_proj").view(n, KV_HEADS, HEAD_DIM)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, dim=1), v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
    return linear(out, state, prefix + "o_proj")


def mlp(x, state, prefix):
    gated = F.silu(linear(x, state, prefix + "gate_proj")) * linear(x, state, prefix + "up_proj")
    return linear(gated, state, prefix + "down_proj")


def reference_eagle2(state, target, ids, features):
    x = linear(torch.cat([target.backbone.embed_tokens.weight[ids], features], -1), state, "fc")
    x = x + causal_attention(x, state, "layers.0.self_attn.")  # no input norm
    return x + mlp(rms_norm(x, state["layers.0.post_attention_layernorm.weight"]), state, "layers.0.mlp.")


def reference_eagle3(state, target, ids, features):
    h = features @ state["fc.weight"].T if features.shape[-1] == 3 * H else features
    emb = rms_norm(target.backbone.embed_tokens.weight[ids], state["midlayer.input_layernorm.weight"])
    attn_in = torch.cat([emb, rms_norm(h, state["midlayer.hidden_norm.weight"])], -1)
    x = h + causal_attention(attn_in, state, "midlayer.self_attn.")
    return x + mlp(rms_norm(x, state["midlayer.post_attention_layernorm.weight"]), state, "midlayer.mlp.")


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# ---- loading external formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type,qkv_bias,fc_bias,fmt", [
    ("llama", False, True, "bin"), ("qwen2", True, True, "safetensors"), ("qwen2", False, False, "bin"),
    ("qwen3", False, True, "safetensors"),
])
def test_safeailab_eagle2_checkpoint_computes_what_its_tensors_say(tmp_path, model_type, qkv_bias, fc_bias, fmt):
    target = TargetModel(tiny_hf_model(model_type))
    config, state = eagle2_checkpoint(qkv_bias, fc_bias)
    head = load_head(write(tmp_path / "head", config, state, fmt), target)
    assert isinstance(head, Eagle2Head) and head.kind == "eagle2" and head.aux_layers == ()
    assert head.lm_head_weight is target.lm_head_weight and head.head_to_target is None
    assert "embed_tokens.weight" not in head.state_dict()
    ids, features = torch.randint(0, VOCAB, (9,)), rand(9, H, scale=1.0)
    hidden = head(ids, features, head.new_cache(16))
    expected = reference_eagle2(state, target, ids, features)
    close(hidden, expected)
    close(head.lm_input(hidden) @ head.lm_head_weight.T, expected @ target.lm_head_weight.T)


@pytest.mark.parametrize("layout", ["safeailab", "specforge"])
def test_eagle3_checkpoint_computes_what_its_tensors_say(tmp_path, layout):
    target = TargetModel(tiny_hf_model("qwen2"))
    config, state, draft_ids = eagle3_checkpoint(layout)
    fmt = "bin" if layout == "safeailab" else "safetensors"
    head = load_head(write(tmp_path / "head", config, state, fmt), target)
    assert isinstance(head, Eagle3Head) and head.kind == "eagle3"
    assert torch.equal(head.head_to_target, draft_ids) and torch.equal(head.t2d, state["t2d"])
    ids = torch.randint(0, VOCAB, (9,))
    for width in (3 * H, H):  # the target's fused features, then the head's own output while drafting
        features = rand(9, width, scale=1.0)
        hidden = head(ids, features, head.new_cache(16))
        expected = reference_eagle3(state, target, ids, features)
        close(hidden, expected)
        logits = rms_norm(expected, state["norm.weight"]) @ state["lm_head.weight"].T  # [n, draft_vocab]
        close(head.lm_input(hidden) @ head.lm_head_weight.T, logits)


def test_eagle3_aux_layers_follow_eagle3_and_config_conventions():
    assert default_aux_layers(32) == (2, 16, 29) and default_aux_layers(8) == (2, 4, 5)
    assert default_aux_layers(2) == (0, 1, 2)  # too shallow for EAGLE's choice: the last three
    assert aux_layers_from({"eagle_aux_hidden_state_layer_ids": [1, 3, 5]}) == (1, 3, 5)  # vLLM: hidden_states idx
    assert aux_layers_from({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 3, 5]}}) == (2, 4, 6)  # SGLang
    assert aux_layers_from({}) is None


def test_eagle3_target_features_are_hf_hidden_states_at_aux_layers():
    model = tiny_hf_model("llama", layers=8)
    target = TargetModel(model)
    head = random_head(target, "eagle3")
    assert head.aux_layers == (2, 4, 5)
    ids = torch.randint(0, VOCAB, (7,))
    features = head.target_features(target.forward(ids, target.new_cache(16), aux_layers=head.aux_layers))
    states = model(ids.unsqueeze(0), output_hidden_states=True).hidden_states
    close(features, torch.cat([states[i][0] for i in (2, 4, 5)], dim=-1))
    assert head(ids, features, head.new_cache(16)).shape == (7, H)


# ---- our own checkpoints -------------------------------------------------------------------------------------
def reduced_vocab_head(target, seed=0):
    torch.manual_seed(seed)
    draft_ids = torch.randperm(target.vocab_size)[:DRAFT_VOCAB].sort().values
    return Eagle3Head(target, draft_vocab_size=DRAFT_VOCAB, d2t=draft_ids - torch.arange(DRAFT_VOCAB)), draft_ids


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_save_load_round_trip(tmp_path, kind):
    target = TargetModel(tiny_hf_model("qwen2"))
    head = random_head(target, "eagle2", seed=3) if kind == "eagle2" else reduced_vocab_head(target)[0]
    ids, features = torch.randint(0, VOCAB, (6,)), rand(6, H if kind == "eagle2" else 3 * H, scale=1.0)
    expected = head(ids, features, head.new_cache(8))

    save_head(head, tmp_path / "exact", extra_config={"target_model": "tiny-qwen2"}, dtype=torch.float32)
    loaded = load_head(str(tmp_path / "exact"), target)
    assert type(loaded) is type(head)
    torch.testing.assert_close(loaded(ids, features, loaded.new_cache(8)), expected, atol=0, rtol=0)
    config = json.loads((tmp_path / "exact" / "config.json").read_text())
    assert config["target_model"] == "tiny-qwen2"
    if kind == "eagle2":
        assert config["architectures"] == ["NanoSpecEagle2Head"] and config["bias"] is True
    else:
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == DRAFT_VOCAB
        assert loaded.aux_layers == head.aux_layers and torch.equal(loaded.head_to_target, head.head_to_target)

    save_head(head, tmp_path / "bf16")  # the default: bf16 weights, integer maps untouched
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any("embed" in k for k in keys)
        assert ("lm_head.weight" in keys) == (kind == "eagle3")
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
        if kind == "eagle3":
            assert f.get_tensor("d2t").dtype == torch.int64 and f.get_tensor("t2d").dtype == torch.bool
    rounded = load_head(str(tmp_path / "bf16"), target)(ids, features, head.new_cache(8))
    assert (rounded - expected).abs().max() < 0.02 * expected.abs().max()


def test_random_head_is_reproducible_and_leaves_the_global_rng_alone():
    target = TargetModel(tiny_hf_model("llama"))
    rng = torch.get_rng_state()
    first, second = random_head(target, "eagle3", seed=1), random_head(target, "eagle3", seed=1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert load_head("random", target).kind == "eagle2"
    with pytest.raises(NanoSpecError, match="unknown EAGLE head kind"):
        random_head(target, "medusa")


# ---- clear errors --------------------------------------------------------------------------------------------
def test_bad_checkpoints_raise_one_clear_error(tmp_path):
    target = TargetModel(tiny_hf_model("llama"))
    config, state = eagle2_checkpoint()

    def fails(folder, match, cfg=config, st=state, fmt="safetensors"):
        with pytest.raises(NanoSpecError, match=match):
            load_head(write(tmp_path / folder, cfg, st, fmt), target)

    small = {k: v[..., :32] if k == "fc.weight" else v for k, v in state.items()}
    fails("hidden", "hidden size 32 does not match", {**config, "hidden_size": 32}, small)
    fails("heads", "8 attention heads", {**config, "num_attention_heads": 8})
    fails("vocab", "vocabulary of 1000", st={**state, "embed_tokens.weight": rand(1000, H)})
    fails("format", "not an EAGLE-2 or EAGLE-3", st={"foo.weight": rand(4, 4)})
    fails("missing", "missing", st={k: v for k, v in state.items() if "down_proj" not in k})
    fails("shape", "has shape", {**config, "intermediate_size": 128})

    e3_config, e3_state, _ = eagle3_checkpoint("specforge")
    fails("zero_d2t", "d2t map is all zeros", e3_config, {**e3_state, "d2t": torch.zeros(DRAFT_VOCAB, dtype=torch.long)})
    fails("no_d2t", "d2t map is missing", e3_config, {k: v for k, v in e3_state.items() if k != "d2t"})

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NanoSpecError, match="no weights"):
        load_head(str(tmp_path / "empty"), target)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NanoSpecError, match="cannot read"):
        load_head(str(tmp_path / "corrupt"), target)
    with pytest.raises(NanoSpecError, match="not found"):
        load_head(str(tmp_path / "no" / "such" / "folder"), target)
    with pytest.raises(NanoSpecError, match="could not be fetched"):  # HF_HUB_OFFLINE=1 (conftest), not cached
        load_head("nanospec-tests/no-such-head", target)


# ---- KV-cache semantics, as for the target -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_tree_forward_equals_full_forward_on_each_path(kind):
    target = TargetModel(tiny_hf_model("qwen2"))
    head = random_head(target, kind, seed=2)
    width = H if kind == "eagle2" else 3 * H
    prefix, prefix_features = torch.randint(0, VOCAB, (10,)), rand(10, width, scale=1.0)
    tokens, features = torch.randint(0, VOCAB, (4,)), rand(4, width, scale=1.0)
    mask, depth = tree_example()
    cache = head.new_cache(32)
    head(prefix, prefix_features, cache)
    cache.commit()
    tree = head(tokens, features, cache, positions=10 + depth, tree_mask=mask)
    cache.discard()
    for node, path in {1: [0, 1], 2: [0, 2], 3: [0, 1, 3]}.items():
        full = head(torch.cat([prefix, tokens[path]]), torch.cat([prefix_features, features[path]]),
                    head.new_cache(32))
        close(tree[node], full[-1])


@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_draft_levels_in_the_pending_tail_then_commit_equal_full_forward(kind):
    """Two draft levels (2 nodes each) share the pending tail; committing one path leaves the path's cache."""
    target = TargetModel(tiny_hf_model("llama"))
    head = random_head(target, kind, seed=4)
    width = H if kind == "eagle2" else 3 * H
    prefix, prefix_features = torch.randint(0, VOCAB, (8,)), rand(8, width, scale=1.0)
    level_ids = torch.randint(0, VOCAB, (2, 2))  # [level, node]; node j of level 2 is a child of node j of level 1
    level_features = rand(2, 2, width, scale=1.0)
    cache = head.new_cache(32)
    head(prefix, prefix_features, cache)
    cache.commit()
    head(level_ids[0], level_features[0], cache, positions=torch.tensor([8, 8]), tree_mask=torch.eye(2).bool())
    second_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)  # [n, pending + n]
    second = head(level_ids[1], level_features[1], cache, positions=torch.tensor([9, 9]), tree_mask=second_mask)
    for j in range(2):
        full = head(torch.cat([prefix, level_ids[:, j]]), torch.cat([prefix_features, level_features[:, j]]),
                    head.new_cache(32))
        close(second[j], full[-1])
    cache.commit(torch.tensor([1, 3]))  # keep node 1 of level 1 and its child
    nxt, nxt_features = torch.randint(0, VOCAB, (1,)), rand(1, width, scale=1.0)
    after = head(nxt, nxt_features, cache)
    full = head(torch.cat([prefix, level_ids[:, 1], nxt]),
                torch.cat([prefix_features, level_features[:, 1], nxt_features]), head.new_cache(32))
    close(after[0], full[-1])


# ---- dtype and training ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eagle2", "eagle3"])
def test_head_follows_a_bf16_target(kind):
    exact = random_head(TargetModel(tiny_hf_model("qwen2")), kind, seed=5)
    head = random_head(TargetModel(tiny_hf_model("qwen2", dtype=torch.bfloat16)), kind, seed=5)
    assert all(p.dtype == torch.bfloat16 for p in head.parameters())
    assert head._rotary[0].inv_freq.dtype == torch.float32  # positions stay exact
    width = H if kind == "eagle2" else 3 * H
    ids, features = torch.randint(0, VOCAB, (12,)), rand(12, width, scale=1.0)
    out = head(ids, features, head.new_cache(16))
    ref = exact(ids, features, exact.new_cache(16))
    assert out.dtype == torch.bfloat16 and head.new_cache(4).keys.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradients_reach_the_head_not_the_target():
    target = TargetModel(tiny_hf_model("qwen2"))
    head = random_head(target, "eagle3")
    ids = torch.randint(0, VOCAB, (6,))
    out = target.forward(ids, target.new_cache(8), aux_layers=head.aux_layers)  # inference-mode tensors
    hidden = head(ids, head.target_features(out), head.new_cache(8))
    logits = head.lm_input(hidden) @ head.lm_head_weight.T
    F.cross_entropy(logits[:-1], ids[1:]).backward()
    assert head.fc.weight.grad is not None and head.midlayer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert target.backbone.embed_tokens.weight.grad is None
