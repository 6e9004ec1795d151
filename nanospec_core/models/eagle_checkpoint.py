"""Reading and writing EAGLE head checkpoints (a folder or a hub repo with config.json and one weight file).

The format is detected from the weight names (config.json only supplies sizes):
  EAGLE-1/2, SafeAILab (cnets1.py): config.json is a one-layer LlamaConfig plus an optional "bias" (fc bias, default
    true); pytorch_model.bin or model.safetensors holding
      fc.weight [H, 2H], fc.bias [H]
      layers.0.self_attn.{q,k,v,o}_proj.weight (+ q/k/v .bias in Qwen2 heads), layers.0.mlp.{gate,up,down}_proj.weight
      layers.0.post_attention_layernorm.weight (no input_layernorm: the layer reads fc's output directly)
      embed_tokens.weight (optional copy of the target's; ignored, we read the target's own)
  EAGLE-3, SafeAILab (cnets.py) and SpecForge (LlamaForCausalLMEagle3), same names in both: config.json with
    "draft_vocab_size" and architectures like ["LlamaForCausalLMEagle3"]; weights
      fc.weight [H, 3H], norm.weight [H], lm_head.weight [draft_vocab, H]
      midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight, midlayer.mlp.*
      midlayer.self_attn.{q,k,v}_proj.weight [*, 2H], midlayer.self_attn.o_proj.weight
      d2t [draft_vocab] int64 (target id = i + d2t[i]), t2d [V] bool, embed_tokens.weight (optional, ignored)
    speculators-format heads (layers.0.* with hidden_norm) are renamed to midlayer.*.
  Aux layers: a top-level "eagle_aux_hidden_state_layer_ids" is read as vLLM does (HF hidden_states indices, what we
    write); SGLang's "eagle_config": {"eagle_aux_hidden_state_layer_ids"} names layer OUTPUTS, so +1; default
    (2, L // 2, L - 3).
Optional pieces follow the weights: q/k/v/o biases and Qwen3-style q/k norms exist in the head iff they are saved.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import NanoSpecError
from .eagle import DraftHead, Eagle2Head, Eagle3Head, layer_config, random_head
from .target import TargetModel

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
NOISE_KEYS = ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
              "output_attentions", "output_hidden_states", "return_dict")  # PretrainedConfig defaults, not the head
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
IGNORED_KEYS = ("embed_tokens.weight",)
TIED_KEY = "nanospec_lm_head_tied_to_target"  # config.json: the head scores with the target's lm head (not saved)
NANOSPEC_VLLM_ARCHITECTURE = "NanoSpecLlamaForCausalLMEagle3"  # the vLLM plugin's draft model (vllm_plugin/nanospec_vllm)


def load_head(source: str, target: TargetModel) -> DraftHead:
    if source == "random":
        return random_head(target)
    config_path, weights_path = head_files(source)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise NanoSpecError(f"EAGLE head {source}: cannot read config.json ({exc})") from None
    state = normalize_keys(read_weights(weights_path))
    check_sizes(source, config, state, target)
    if any(key.startswith("midlayer.") for key in state):
        head = eagle3_head(source, config, state, target)
    elif "fc.weight" in state and any(key.startswith("layers.0.") for key in state):
        bias = "fc.bias" in state  # the weights decide; config's "bias" can only agree
        head = Eagle2Head(target, layer_config(type(target.config), target, config), bias=bias)
        match_optional(head.layers[0], state, "layers.0.", head.dtype)
        load_weights(head, state, source)
    else:
        raise NanoSpecError(f"EAGLE head {source}: not an EAGLE-2 or EAGLE-3 checkpoint (no fc / layers.0 / "
                            f"midlayer weights; found {', '.join(sorted(state)[:4])}, ...)")
    return head.eval()


def head_files(source: str) -> tuple[Path, Path]:
    """config.json and the weight file of a local folder, else of a hub repo (downloaded unless HF_HUB_OFFLINE)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NanoSpecError(f"EAGLE head folder {path} has no config.json")
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / "config.json", path / name
        raise NanoSpecError(f"EAGLE head folder {path} has no weights ({' or '.join(WEIGHT_FILES)})")
    if path.exists() or not HUB_ID.fullmatch(source):
        raise NanoSpecError(f"EAGLE head {source!r} not found: pass a folder with config.json and weights, "
                            f"a hub id, or 'random'")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise NanoSpecError("huggingface_hub is needed to download EAGLE heads: pip install huggingface_hub") from None
    try:
        config_path = Path(hf_hub_download(source, "config.json"))
        for name in WEIGHT_FILES:
            try:
                return config_path, Path(hf_hub_download(source, name))
            except EntryNotFoundError:
                continue
    except Exception as exc:  # offline, unknown repo, network: all mean "cannot get it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NanoSpecError(f"EAGLE head {source!r} is not a local folder and could not be fetched from the "
                            f"Hugging Face hub ({reason})") from None
    raise NanoSpecError(f"hub repo {source} has config.json but no {' or '.join(WEIGHT_FILES)}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NanoSpecError(f"cannot read EAGLE head weights {path}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NanoSpecError(f"{path} is not a state dict of tensors")
    return state


def normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop training wrappers' prefixes; rename speculators' EAGLE-3 layer (layers.0.* with hidden_norm) midlayer.*."""
    def strip(key: str) -> str:
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        return key

    state = {strip(k): v for k, v in state.items()}
    if "layers.0.hidden_norm.weight" in state:
        state = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                 for k, v in state.items()}
    return state


def check_sizes(source: str, config: dict, state: dict, target: TargetModel) -> None:
    """The clear errors for a head trained for another model (before any shape mismatch deep in loading)."""
    hidden = config.get("hidden_size", target.hidden_size)
    fc = state.get("fc.weight")
    if hidden != target.hidden_size or (fc is not None and fc.shape[0] != target.hidden_size):
        got = hidden if hidden != target.hidden_size else fc.shape[0]
        raise NanoSpecError(f"EAGLE head {source}: hidden size {got} does not match the target's "
                            f"{target.hidden_size}; the head was trained for another model")
    heads = config.get("num_attention_heads", target.config.num_attention_heads)
    is_eagle3 = any(k.startswith("midlayer.") for k in state)
    if not is_eagle3 and heads != target.config.num_attention_heads:
        raise NanoSpecError(f"EAGLE head {source}: {heads} attention heads, the target has "
                            f"{target.config.num_attention_heads}; the head was trained for another model")
    embed = state.get("embed_tokens.weight")
    vocab = embed.shape[0] if embed is not None else state["t2d"].shape[0] if "t2d" in state else None
    if vocab is not None and vocab != target.vocab_size:
        raise NanoSpecError(f"EAGLE head {source}: vocabulary of {vocab} ids, the target has {target.vocab_size}; "
                            f"the head was trained for another model")


def eagle3_head(source: str, config: dict, state: dict, target: TargetModel) -> Eagle3Head:
    from transformers import LlamaConfig

    tied = bool(config.get(TIED_KEY, False))
    if "lm_head.weight" not in state and not tied:
        raise NanoSpecError(f"EAGLE head {source}: EAGLE-3 checkpoint without lm_head.weight (and config.json does "
                            f"not say {TIED_KEY})")
    try:
        head = Eagle3Head(target, layer_config(LlamaConfig, target, config),
                          draft_vocab_size=None if tied else state["lm_head.weight"].shape[0], d2t=state.get("d2t"),
                          aux_layers=aux_layers_from(config),
                          norm_before_residual=bool(config.get("norm_before_residual", False)), tied_lm_head=tied)
    except NanoSpecError as exc:
        raise NanoSpecError(f"EAGLE head {source}: {exc}") from None
    match_optional(head.midlayer, state, "midlayer.", head.dtype)
    load_weights(head, state, source, skip=("d2t", "t2d"))
    return head


def aux_layers_from(config: dict) -> tuple[int, ...] | None:
    if config.get("eagle_aux_hidden_state_layer_ids"):  # vLLM / speculators / ours: HF hidden_states indices
        return tuple(config["eagle_aux_hidden_state_layer_ids"])
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:  # SGLang: "layer i's output" = hidden_states[i + 1]
        return tuple(i + 1 for i in nested)
    return None


def match_optional(layer: nn.Module, state: dict, prefix: str, dtype) -> None:
    """Give the layer exactly the optional pieces the checkpoint has: attention biases and q/k norms."""
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        linear = getattr(attn, name)
        saved = f"{prefix}self_attn.{name}.bias" in state
        if saved and linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=dtype, device=linear.weight.device))
        elif not saved and linear.bias is not None:
            linear.register_parameter("bias", None)
    saved_norms = f"{prefix}self_attn.q_norm.weight" in state
    if saved_norms and not hasattr(attn, "q_norm"):
        norm_class = type(layer.post_attention_layernorm)
        eps = layer.post_attention_layernorm.variance_epsilon
        device = linear.weight.device
        attn.q_norm = norm_class(attn.head_dim, eps=eps).to(device=device, dtype=dtype)
        attn.k_norm = norm_class(attn.head_dim, eps=eps).to(device=device, dtype=dtype)
    elif not saved_norms and hasattr(attn, "q_norm"):
        del attn.q_norm, attn.k_norm


def load_weights(head: DraftHead, state: dict, source: str, skip: tuple[str, ...] = ()) -> None:
    """Strict load with one clear line for missing / unexpected / mis-shaped tensors."""
    own = {k: v for k, v in head.state_dict().items() if k not in skip}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k not in skip and k not in IGNORED_KEYS
                  and not k.endswith("rotary_emb.inv_freq")]  # old checkpoints saved the rotary buffer
    if missing or unexpected:
        raise NanoSpecError(f"EAGLE head {source}: weights do not fit an {head.kind} head "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, param in own.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise NanoSpecError(f"EAGLE head {source}: {key} has shape {tuple(state[key].shape)}, expected "
                                f"{tuple(param.shape)} (config.json and weights disagree, or another model's head)")
    head.load_state_dict({k: state[k] for k in own}, strict=False)


def save_head(head: DraftHead, folder: str | Path, extra_config: dict | None = None,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """config.json (the layer's HF config + format fields + extra_config) and model.safetensors (no embeddings,
    no shared target lm head; float tensors in `dtype`, d2t / t2d as they are)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in head.config.to_dict().items() if k not in NOISE_KEYS}
    dtype_name = str(dtype).removeprefix("torch.")
    config.update(num_hidden_layers=1, vocab_size=head.target.vocab_size, dtype=dtype_name, torch_dtype=dtype_name)
    if head.kind == "eagle2":
        config.update(architectures=["NanoSpecEagle2Head"], bias=head.fc.bias is not None)
    else:
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=head.draft_vocab_size,
                      eagle_aux_hidden_state_layer_ids=list(head.aux_layers),
                      norm_before_residual=head.norm_before_residual, **{TIED_KEY: head.tied_lm_head})
    config["nanospec_head_kind"] = head.kind
    config.update(extra_config or {})
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in head.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def export_checkpoint(head: Eagle3Head, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                      nanospec: dict | None = None) -> Path:
    """The public EAGLE-3 layout (SafeAILab / SpecForge `LlamaForCausalLMEagle3`, which vLLM and SGLang load):
    fc / midlayer.* / norm / lm_head, the lm head written out even when tied to the target's here, d2t / t2d only
    for a pruned draft vocabulary, aux layers under both the top-level key (HF hidden_states indices, read by
    vLLM and by load_head) and SGLang's eagle_config (layer outputs: index - 1). `nanospec` (static core, capacity)
    names the NanoSpec vLLM plugin's architecture instead (vllm_plugin/nanospec_vllm). Returns the folder."""
    if head.kind != "eagle3":
        raise NanoSpecError(f"only EAGLE-3 heads have a public serving layout (this is {head.kind})")
    from safetensors.torch import save_file

    folder = Path(folder)
    save_head(head, folder, dtype=dtype)  # config.json and the head's own tensors
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in head.state_dict().items()}
    tensors["lm_head.weight"] = head.lm_head_weight.detach().to(dtype).cpu().contiguous()
    if head.head_to_target is None:  # full vocabulary: no map to ship
        tensors.pop("d2t", None)
        tensors.pop("t2d", None)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update({TIED_KEY: False, "tie_word_embeddings": False,
                   "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in head.aux_layers]}})
    if nanospec is not None:
        config.update({"architectures": [NANOSPEC_VLLM_ARCHITECTURE], "nanospec": nanospec})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
