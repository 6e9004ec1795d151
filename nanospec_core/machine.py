"""The machine decides: device, dtype and CPU weight layout, chosen by measurement and cached per machine.

What is fast changes from machine to machine, and no flag list predicts it. Seen on the embedded 0.5B target:
  * Intel Xeon, AVX512-BF16, no AMX: bf16 ran every method at 0.84-0.98x its float32 speed;
  * AMD EPYC, AVX2 only: bf16 emulated, ~3x slower than float32;
  * AMD EPYC (Zen 4), AVX512-BF16: bf16 linears 2.5x faster than float32 at 1 row, 4.4x at 8 rows.
The weight layout is the same kind of choice: MKL ran float32 `F.linear` over 4-16 rows 2x faster with
column-major weights on the Xeon (cpu_layout.py), while in bf16 on the Zen 4 row-major was faster.

So `auto` probes. On the model's own linear shapes (q, k, v, o, gate, up, down of PROBE_LAYERS distinct random
layers, scaled to the model's depth, and the lm head) it times `F.linear` at 1 row (a plain decode step) and at
PROBE_ROWS rows (a verified draft tree) for every candidate dtype and layout:

    cost(dtype, layout, part) = ms(1 row) + ms(PROBE_ROWS rows)        part: backbone | lm head
    layout(dtype, part)       = argmin over layouts of cost             (CPU only; GPUs keep row-major)
    dtype                     = argmin over dtypes of sum over parts of the best cost
A challenger must beat the default by MARGIN: row-major is the default layout (column-major costs a second copy
of the lm head), float32 the default dtype (it keeps greedy output exact); within the probe's run-to-run noise
(a few percent, measured) the default stays.

Random weights of the real shapes, not the loaded ones, so the probe runs before the model is loaded in the
chosen dtype; several distinct layers, so the weights do not sit in the last-level cache the way one layer would.
The decision is cached in `cache_dir()/machine.json`, keyed by CPU model, core and thread count, torch version,
device, the shapes and the candidates: a second start costs nothing.

    >>> choice = choose_runtime(hf_config, device="auto", dtype="auto")    # doctest: +SKIP
    >>> choice.describe()                                                   # doctest: +SKIP
    'bf16: measured 2.6x faster than float32 on this CPU (AMD EPYC, 2 threads); row-major weights'
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import cache_dir
from .config import DTYPES
from .errors import NanoSpecError

PROBE_ROWS = 8  # rows of a verified CPU draft tree (root + 7 nodes): the verify forward's batch
BULK_ROWS = 128  # feature extraction and head training: matmuls over hundreds of rows (compute-bound, not
# weight-bound), where the fastest dtype can differ (Xeon 207: bf16 won at 1-8 rows and ran a 512-token prefill
# 1.8x slower than float32); train-head probes at these rows
PROBE_LAYERS = 4  # distinct layers timed (x num_layers / PROBE_LAYERS): more bytes than a last-level cache
PROBE_REPEATS = 3  # medians of 3 after one warm-up call
LAYOUTS = ("row", "column")  # the first is the default
MARGIN = 1.05  # a non-default layout or dtype must be this much faster (probe noise measured at 2-5%)
SHORT = {"float32": "float32", "bfloat16": "bf16", "float16": "fp16"}

# costs: "dtype/layout/part/rows" -> ms, e.g. "bfloat16/row/backbone/8"
Probe = Callable[..., dict[str, float]]  # (shapes, device, dtypes, layouts, rows=...) -> costs


@dataclass(frozen=True)
class ModelShapes:
    """The [out, in] shapes of one decoder layer's linears, the depth, and the lm head's [V, H]."""

    layer: tuple[tuple[int, int], ...]
    num_layers: int
    lm_head: tuple[int, int]

    @classmethod
    def from_config(cls, config) -> "ModelShapes":
        hidden, heads = config.hidden_size, config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        inner = config.intermediate_size
        layer = ((heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
                 (hidden, heads * head_dim), (inner, hidden), (inner, hidden), (hidden, inner))
        return cls(layer=layer, num_layers=config.num_hidden_layers, lm_head=(config.vocab_size, hidden))

    def key(self) -> str:
        return f"L{self.num_layers} {list(self.layer)} lm{list(self.lm_head)}"


@dataclass
class RuntimeChoice:
    """Where and how the model runs, and why: what the CLI's --json, the benchmark and the app report."""

    device: str  # 'cpu' | 'cuda'
    dtype: str  # a DTYPES name
    backbone_layout: str = "row"  # 'row' | 'column': how the target's Linear weights are stored (CPU)
    head_layout: str = "row"  # the lm-head copy that the logits and plain EAGLE's draft multiply with (CPU)
    source: str = "measured"  # 'measured' | 'cached' | 'given' (dtype set by the user; layout still measured)
    speedup: float | None = None  # the chosen dtype's probe cost advantage over the best other dtype
    runner_up: str | None = None  # that other dtype
    probe_s: float = 0.0
    machine: str = ""  # CPU model (or GPU name) and thread count
    costs: dict[str, float] = field(default_factory=dict)  # the probe's timings (ms), see Probe
    from_cache: bool = False  # read from machine.json by this call (no probe ran): the start-up line's "warm"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """One line for status bars: 'bf16: measured 2.6x faster than float32 on this CPU (...); row-major'."""
        name = SHORT.get(self.dtype, self.dtype)
        where = "this GPU" if self.device == "cuda" else "this CPU"
        if self.source == "given":
            line = f"{name} as asked, on {where}" + (" (exact greedy equality)" if self.dtype == "float32" else "")
        elif self.speedup is not None and self.runner_up:
            verb = "measured" if self.source == "measured" else "measured earlier"
            other = SHORT.get(self.runner_up, self.runner_up)
            line = (f"{name}: {verb} {self.speedup:.1f}x faster than {other} on {where}" if self.speedup >= 1 else
                    f"{name}: {other} {verb} only {1 / self.speedup:.2f}x faster on {where}, within noise")
        else:
            line = f"{name} on {where}"
        line += f" ({self.machine})" if self.machine else ""
        if self.device == "cpu":
            layouts = {self.backbone_layout, self.head_layout}
            line += ("; " + f"{layouts.pop()}-major weights" if len(layouts) == 1 else
                     f"; {self.backbone_layout}-major backbone, {self.head_layout}-major lm head")
        return line

    def to_json(self) -> dict:
        return {**asdict(self), "summary": self.describe()}


# ---------------------------------------------------------------------------------------------------------
# Device

def on_zero_gpu() -> bool:
    """A Hugging Face ZeroGPU Space: a GPU is attached only inside @spaces.GPU calls."""
    return "SPACES_ZERO_GPU" in os.environ


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a GPU exists (or a ZeroGPU Space lends one), else 'cpu'; others are checked."""
    if name == "auto":
        return "cuda" if on_zero_gpu() or torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanoSpecError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available() and not on_zero_gpu():
        raise NanoSpecError(f"device {name!r} asked for, but this machine has no CUDA GPU: use --device auto or cpu")
    return str(device)


def machine_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available() and not on_zero_gpu():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------------------
# Probe and decision

def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed_ms(fn, device: str, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):  # the first call warms up
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _weights(shapes: list[tuple[int, int]], dtype: torch.dtype, layout: str, device: str) -> list[torch.Tensor]:
    """Constant-filled weights (values do not change GEMM speed; randn over 100M+ values would cost seconds)."""
    out = []
    for rows, cols in shapes:
        if layout == "column":  # same [out, in] shape, strides (1, out): what cpu_layout stores
            out.append(torch.full((cols, rows), 0.01, dtype=dtype, device=device).t())
        else:
            out.append(torch.full((rows, cols), 0.01, dtype=dtype, device=device))
    return out


def probe_costs(shapes: ModelShapes, device: str, dtypes: tuple[str, ...], layouts: tuple[str, ...],
                rows: tuple[int, ...] = (1, PROBE_ROWS), repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Time F.linear over the model's shapes: {'dtype/layout/part/rows': ms} (backbone scaled to all layers)."""
    layers = min(PROBE_LAYERS, shapes.num_layers)
    costs = {}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for layout in layouts:
            backbone = _weights(list(shapes.layer) * layers, dtype, layout, device)
            head = _weights([shapes.lm_head], dtype, layout, device)
            for n in rows:
                inputs = {cols: torch.full((n, cols), 0.5, dtype=dtype, device=device)
                          for cols in {w.shape[1] for w in backbone + head}}  # one input per `in` width

                def run_backbone():
                    for w in backbone:
                        F.linear(inputs[w.shape[1]], w)

                ms = _timed_ms(run_backbone, device, repeats) * shapes.num_layers / layers
                costs[f"{dtype_name}/{layout}/backbone/{n}"] = ms
                costs[f"{dtype_name}/{layout}/lm_head/{n}"] = _timed_ms(
                    lambda: F.linear(inputs[head[0].shape[1]], head[0]), device, repeats)
            del backbone, head
    return costs


def decide(costs: dict[str, float], dtypes: tuple[str, ...], layouts: tuple[str, ...],
           rows: tuple[int, ...] = (1, PROBE_ROWS), margin: float = MARGIN) -> dict:
    """The fastest (dtype, backbone layout, head layout) under the module docstring's rule, from probe costs."""
    def cost(dtype, layout, part):
        return sum(costs[f"{dtype}/{layout}/{part}/{n}"] for n in rows)

    def pick(options, cost_of, default):
        best = min(options, key=cost_of)
        return best if default not in options or cost_of(best) * margin < cost_of(default) else default

    totals, layout_of = {}, {}
    for dtype in dtypes:
        best = {part: pick(layouts, lambda layout: cost(dtype, layout, part), LAYOUTS[0])
                for part in ("backbone", "lm_head")}
        layout_of[dtype] = best
        totals[dtype] = sum(cost(dtype, best[part], part) for part in best)
    winner = pick(dtypes, totals.get, "float32")
    others = [d for d in dtypes if d != winner]
    runner_up = min(others, key=totals.get) if others else None
    return {"dtype": winner, "backbone_layout": layout_of[winner]["backbone"],
            "head_layout": layout_of[winner]["lm_head"], "runner_up": runner_up,
            "speedup": totals[runner_up] / totals[winner] if runner_up and totals[winner] > 0 else None}


# ---------------------------------------------------------------------------------------------------------
# The cached choice

def _cache_file() -> Path:
    return cache_dir() / "machine.json"


def read_cache(path: Path) -> dict:
    """A JSON cache file's entries ({} when absent or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, entries: dict) -> None:
    """Write a JSON cache atomically (temp file + rename); a read-only cache is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        temp.write_text(json.dumps(entries, indent=1))
        os.replace(temp, path)
    except OSError:  # a read-only cache costs a probe per start, nothing else
        pass


def choose_runtime(hf_config, device: str = "auto", dtype: str = "auto", probe: Probe | None = None,
                   cache: Path | None | bool = True, rows: tuple[int, ...] = (1, PROBE_ROWS)) -> RuntimeChoice:
    """Resolve device, dtype and layout for a model config: measured (or cached), or the user's dtype.

    probe: injectable for tests (default probe_costs); cache: True = cache_dir()/machine.json, a path, or
    False/None for none. rows: the batch sizes the probe times (decoding: 1 and PROBE_ROWS; training and
    extraction: BULK_ROWS).
    """
    device = resolve_device(device)
    if dtype != "auto" and dtype not in DTYPES:
        raise NanoSpecError(f"unknown dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    cuda = torch.device(device).type == "cuda"
    if cuda and on_zero_gpu():  # CUDA may not be touched outside @spaces.GPU: nothing to probe at start
        return RuntimeChoice(device=device, dtype="bfloat16" if dtype == "auto" else dtype,
                             source="given" if dtype != "auto" else "zero-gpu", machine="ZeroGPU")
    dtypes = (dtype,) if dtype != "auto" else (("bfloat16", "float16", "float32") if cuda else
                                               ("float32", "bfloat16"))
    layouts = ("row",) if cuda else LAYOUTS
    shapes = ModelShapes.from_config(hf_config)
    machine = machine_name(device)
    key = f"{machine} | {os.cpu_count()} cores | torch {torch.__version__} | {device} | {shapes.key()} | " \
          f"{','.join(dtypes)} | {','.join(layouts)} | rows {','.join(map(str, rows))}"
    path = _cache_file() if cache is True else (Path(cache) if cache else None)
    entries = read_cache(path) if path else {}
    if key in entries:
        return RuntimeChoice(**{**entries[key], "source": "cached" if dtype == "auto" else "given", "from_cache": True})
    started = time.perf_counter()
    with torch.inference_mode():
        costs = (probe or probe_costs)(shapes, device, dtypes, layouts, rows=rows)
    decision = decide(costs, dtypes, layouts, rows=rows)
    choice = RuntimeChoice(device=device, source="measured" if dtype == "auto" else "given",
                           probe_s=time.perf_counter() - started, machine=machine, costs=costs, **decision)
    if path:
        entries[key] = {k: v for k, v in asdict(choice).items() if k not in ("source", "from_cache")}
        write_cache(path, entries)
    return choice
