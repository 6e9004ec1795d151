"""The compact target forward: logits equal transformers', tree masks equal branch-by-branch, keep-path KV."""
import pytest
import torch

from nanospec_core.models.target import TargetModel
from tests.conftest import tiny_hf_model, tree_example


def hf_logits(model, ids):
    return model(ids.unsqueeze(0)).logits[0].float()


@pytest.mark.parametrize("model_type", ["qwen2", "llama", "qwen3", "mistral"])
def test_prefill_logits_equal_transformers(model_type):
    model = tiny_hf_model(model_type)
    target = TargetModel(model)
    ids = torch.randint(0, 4096, (23,))
    cache = target.new_cache(64)
    ours = target.logits(target.forward(ids, cache).hidden)
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_bf16_logits_close_to_transformers():
    model = tiny_hf_model("qwen2", dtype=torch.bfloat16)
    target = TargetModel(model)
    ids = torch.randint(0, 4096, (17,))
    ours = target.logits(target.forward(ids, target.new_cache(32)).hidden)
    ref = hf_logits(model, ids)
    assert (ours - ref).abs().max() / ref.abs().max() < 0.02


def test_incremental_decode_equals_full_forward(tiny_model):
    target = TargetModel(tiny_model)
    ids = torch.randint(0, 4096, (12,))
    cache = target.new_cache(32)
    target.forward(ids[:8], cache)
    cache.commit()
    steps = []
    for token in ids[8:]:
        steps.append(target.logits(target.forward(token.view(1), cache).hidden))
        cache.commit()
    torch.testing.assert_close(torch.cat(steps), hf_logits(tiny_model, ids)[8:], atol=1e-4, rtol=1e-4)


def verify_tree_after_prefix(target):
    """Commit a 10-token prefix, then run the 4-node example tree into the pending tail."""
    prefix = torch.randint(0, 4096, (10,))
    tree_tokens = torch.randint(0, 4096, (4,))
    mask, depth = tree_example()
    cache = target.new_cache(32)
    target.forward(prefix, cache)
    cache.commit()
    out = target.forward(tree_tokens, cache, positions=10 + depth, tree_mask=mask)
    return prefix, tree_tokens, cache, out


def test_tree_forward_equals_separate_branches(tiny_model):
    target = TargetModel(tiny_model)
    prefix, tree_tokens, cache, out = verify_tree_after_prefix(target)
    tree_logits = target.logits(out.hidden)
    cache.discard()
    branches = {1: [0, 1], 2: [0, 2], 3: [0, 1, 3]}  # verify index -> its root-to-node path
    for node, path in branches.items():
        full = torch.cat([prefix, tree_tokens[path]])
        torch.testing.assert_close(tree_logits[node], hf_logits(tiny_model, full)[-1], atol=1e-4, rtol=1e-4)


def test_keep_path_cache_equals_cache_of_path_alone(tiny_model):
    target = TargetModel(tiny_model)
    prefix, tree_tokens, cache, _ = verify_tree_after_prefix(target)
    cache.commit(torch.tensor([0, 1, 3]))  # accept r -> a -> c
    reference = target.new_cache(32)
    target.forward(torch.cat([prefix, tree_tokens[[0, 1, 3]]]), reference)
    reference.commit()
    assert cache.length == reference.length == 13
    torch.testing.assert_close(cache.keys[:, :, :13], reference.keys[:, :, :13], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.values[:, :, :13], reference.values[:, :, :13], atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 4096, (1,))
    after = target.logits(target.forward(nxt, cache).hidden)
    full = torch.cat([prefix, tree_tokens[[0, 1, 3]], nxt])
    torch.testing.assert_close(after[0], hf_logits(tiny_model, full)[-1], atol=1e-4, rtol=1e-4)


def test_aux_layers_match_hf_hidden_states():
    model = tiny_hf_model("qwen2", layers=4)
    target = TargetModel(model)
    ids = torch.randint(0, 4096, (9,))
    out = target.forward(ids, target.new_cache(16), aux_layers=(1, 2, 4))
    ref = model(ids.unsqueeze(0), output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.aux[:, :128], torch.cat([ref[1][0], ref[2][0]], -1), atol=1e-4, rtol=1e-4)
    # HF's last entry is after the final norm; ours (the last layer's output) is before it.
    torch.testing.assert_close(model.model.norm(out.aux[:, 128:]), ref[4][0], atol=1e-4, rtol=1e-4)
