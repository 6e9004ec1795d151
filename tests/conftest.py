"""Shared fixtures: tiny random-weight models built from configs (nothing is downloaded)."""
from __future__ import annotations

import os

import pytest
import torch

from nanospec_core.bench.app_server import AppServer, free_port  # noqa: F401 - shared with the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models only lose from thread synchronisation

TINY_VOCAB = 4096


def tiny_hf_model(model_type: str = "qwen2", vocab: int = TINY_VOCAB, layers: int = 2, seed: int = 0,
                  dtype=torch.float32):
    """A 2-layer, hidden-64 causal LM of the given family with random weights (scaled up so argmaxes are clear)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(**common, rope_theta=10000.0),
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
    }
    config = configs[model_type]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init's 0.02 std give peaked, varied next-token distributions
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0, 0.15 if "embed" not in name else 1.0)
    return model.to(dtype).eval().requires_grad_(False)


def tree_example():
    """Root r with children a, b; a has child c. Verify order [r, a, b, c]: mask = self and ancestors; depths."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    return mask, torch.tensor([0, 1, 1, 2])


@pytest.fixture(params=["qwen2", "llama"])
def tiny_model(request):
    return tiny_hf_model(request.param)


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer(vocab: int = TINY_VOCAB):
    """A byte-level BPE fast tokenizer of exactly `vocab` ids (trained in ~2 s on made-up text), chat template included.

    Byte-level, because transformers picks the tokenizer class from the model type (Qwen2Tokenizer for qwen2) and
    rebuilds it from the saved vocab and merges with Qwen's byte-level pre-tokenizer and decoder.
    Ids 0, 1, 2 = pad, bos, eos, as in tiny_hf_model's config.
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    rng = random.Random(0)
    common = ("the quick brown fox jumps over a lazy dog write python code def return print list sum of numbers "
              "train travels km hours speed answer translate into french summarize this text please user "
              "assistant").split()
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word():
        return rng.choice(common) if rng.random() < 0.5 else "".join(rng.choices(letters, k=rng.randint(2, 7)))

    corpus = [" ".join(word() for _ in range(30)) for _ in range(3000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:], chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local model folder (tiny random Qwen2 + byte-level BPE tokenizer) that Session / NANOSPEC_MODEL can load."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_hf_model("qwen2").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def app_server(tiny_model_dir, tmp_path_factory):
    """The Gradio app serving the tiny model (random head, float32), shared by the client and browser tests."""
    server = AppServer(tiny_model_dir, tmp_path_factory.mktemp("app") / "app.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
