"""Tiny random models for the engine tests: a Qwen2 target (float32, CPU), EAGLE-3 heads exported by nanospec_core as
for the real target, a word-level tokenizer (`vllm serve` needs one), and one engine per process
(nanospec_vllm.phase)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # nanospec_core builds and exports the heads

VOCAB = 4096


def build_target(folder: Path, *, constant: bool = False, peak: float = 1.0, one_column: list[int] | None = None):
    """constant: every logit 0 (the greedy choice is always id 0); peak: the lm head scaled; one_column: the lm head
    reads hidden dimension 0 only, on these ids (weights -peak..peak), so every other id has logit 0: a head sharing
    this lm head puts its mass on the same ids, at either end depending on the sign of its own dimension 0 (drafts
    are often, not always, accepted: the sampling checks)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        if constant:
            torch.nn.init.zeros_(model.lm_head.weight)
        model.lm_head.weight.mul_(peak)
        if one_column is not None:
            torch.nn.init.zeros_(model.lm_head.weight)
            model.lm_head.weight[one_column, 0] = torch.linspace(-peak, peak, len(one_column))
    model.save_pretrained(folder)
    return model


def word_tokenizer(folder: Path) -> Path:
    """Token i is the word "t<i>" (0, 1, 2: pad, bos, eos): text and ids map one to one. Saved in a folder of its own
    (the server's --tokenizer): beside a config.json of model_type qwen2, AutoTokenizer would load Qwen2Tokenizer,
    which rebuilds a byte-level BPE and encodes every prompt to no ids at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def export_head(target, folder: Path, nanospec: dict | None, *, own_lm_head: bool = True, seed: int = 1, **options):
    """An EAGLE-3 head for `target` (a transformers model) in the public layout; own_lm_head=False drops the lm
    head from the checkpoint (vLLM then shares the target's into the draft, after loading)."""
    import torch
    from safetensors.torch import load_file, save_file

    from nanospec_core.models.eagle import random_head
    from nanospec_core.models.eagle_checkpoint import export_checkpoint
    from nanospec_core.models.target import TargetModel

    head = random_head(TargetModel(target), "eagle3", seed=seed, **options)
    export_checkpoint(head, folder, dtype=torch.float32, nanospec=nanospec)
    if not own_lm_head:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors.pop("lm_head.weight")
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return head


def flatten_draft(folder: Path) -> None:
    """Zero the head's final norm at hidden dimension 0: with a one-column lm head (build_target) every draft logit
    is then 0, so q is uniform over the request's set (core, prompt, committed ids) and a draft is accepted with
    probability sum_i min(p_i, q_i): often, never always; a rejected one is replaced from (p - q)+, which differs
    from p wherever q is large, so a q that is not the one the draft was sampled from shows in the output."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["norm.weight"][0] = 0.0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def engine_env(**extra) -> dict:
    from nanospec_vllm.phase import engine_env as base

    return {**os.environ, **base(kv_cache_gib=1), **extra}


def phase(root: Path, name: str, model: Path, draft: Path | None, prompts: list, env: dict | None = None,
          **options) -> dict:
    """One engine in its own process; the result of its one batch."""
    batch = options.pop("batch", 4)
    spec = {"model": str(model), "draft": draft and str(draft), "dtype": "float32", "max_model_len": 256,
            "batches": [batch], "prompts": prompts, "max_tokens": 40, "ignore_eos": True, "eager": True,
            "num_speculative_tokens": 3, **options}
    spec_path, out = root / f"{name}.json", root / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, "-m", "nanospec_vllm.phase", str(spec_path), str(out)],
                         env=engine_env(**(env or {})), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())[str(batch)]
