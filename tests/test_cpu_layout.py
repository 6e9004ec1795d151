"""Column-major weight storage for CPU few-row products: same values, same results, one cached copy."""
import torch
from torch import nn

from nanospec_core.models.cpu_layout import (add_column_major_copy, apply_layout, column_major_linears,
                                             matmul_weight, patch_lm_head)


def test_column_major_linears_keep_values_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16, bias=False))
    x = torch.randn(8, 32)
    before = model(x)
    weights = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    assert column_major_linears(model) == 2
    for module, weight in zip([m for m in model if isinstance(m, nn.Linear)], weights):
        assert module.weight.shape == weight.shape and module.weight.stride() == (1, weight.shape[0])
        assert torch.equal(module.weight, weight)
    torch.testing.assert_close(model(x), before)
    assert column_major_linears(model) == 0  # already converted: nothing to do


def test_column_major_copy_is_one_registered_copy_with_the_same_values():
    weight = torch.randn(100, 24)
    assert matmul_weight(weight) is weight  # no layout chosen: the weight itself
    view = add_column_major_copy(weight)
    assert view.shape == weight.shape and view.stride() == (1, 100) and torch.equal(view, weight)
    assert add_column_major_copy(weight) is view and matmul_weight(weight) is view  # target + EAGLE share it
    assert view.data_ptr() != weight.data_ptr()  # the original keeps its row-major rows (embedding lookups)
    h = torch.randn(8, 24)
    torch.testing.assert_close(nn.functional.linear(h, view), h @ weight.T)
    assert add_column_major_copy(view) is view  # not contiguous: returned as is


def test_hf_lm_head_uses_the_shared_copy_and_keeps_its_tied_weight():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    before = model(ids).logits
    assert patch_lm_head(model, column=True)
    weight = model.lm_head.weight
    assert weight is model.model.embed_tokens.weight and weight.is_contiguous()  # still tied, rows intact
    torch.testing.assert_close(model(ids).logits, before)
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        matmul_weight(weight).mul_(2)  # only the copy changes: the head's output must follow it
        torch.testing.assert_close(model.lm_head(hidden), 2 * hidden @ weight.T)


def test_hf_lm_head_multiplies_a_contiguous_input(monkeypatch):
    """generate's prefill hands the lm head hidden[:, -1:, :]; a strided 3-D input makes the CPU F.linear copy the
    weight once per batch row, so the patched head must make it contiguous (same values)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nanospec_core.models import cpu_layout

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(config).eval()
    assert patch_lm_head(model, column=False)
    seen, linear = [], cpu_layout.F.linear
    monkeypatch.setattr(cpu_layout.F, "linear", lambda x, w, b=None: seen.append(x.is_contiguous()) or linear(x, w, b))
    strided = torch.randn(4, 7, 32)[:, -1:, :]
    assert not strided.is_contiguous()
    out = model.lm_head(strided)
    assert seen == [True]
    torch.testing.assert_close(out, strided @ model.lm_head.weight.T)


def test_apply_layout_row_is_a_no_op_and_column_converts_both_parts():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    apply_layout(model, "row", "row")
    assert model.model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert matmul_weight(model.lm_head.weight) is model.lm_head.weight
    apply_layout(model, "column", "column")
    assert model.model.layers[0].mlp.up_proj.weight.stride() == (1, 64)
    assert matmul_weight(model.lm_head.weight).stride() == (1, 300)
