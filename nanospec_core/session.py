"""A loaded target (plus its draft head) shared by every request: the CLI, the benchmark and the app use this.

    session = Session("embedded")
    result = session.generate("nanospec", "Write a quicksort in Python.", GenerationConfig(max_new_tokens=64))
    print(result.text, result.summary.tokens_per_s, result.summary.mean_accepted)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .config import COPY_METHODS, DRAFT_METHODS, METHODS, CopyConfig, GenerationConfig, TreeConfig, VocabConfig
from .decoding.engine import speculative_decode
from .decoding.request import Request
from .decoding.tree_choice import (TreeChoice, best_widths, choose_copy, choose_tree, held_depths, interpolate,
                                   load_acceptance, predict)
from .decoding.plain import hf_generate, plain_decode
from .errors import NanoSpecError
from .metrics import RunSummary, StepStats, summarize
from .machine import RuntimeChoice, choose_runtime, read_cache
from .models.loading import cache_dir, is_converted, load_model, resolve_model_dir
from .models.target import TargetModel
from .paths import HEAD_KINDS, shipped_head_dir

# The prompt of the one short decode that measures a real round's cost beyond the cost curves (Session._round_overhead)
CALIBRATION_PROMPT = "Explain what a hash map is, then write a short Python function that counts words with one."

PROMPT_LOOKUP_TOKENS = 10  # transformers' prompt-lookup decoding: candidate tokens copied from the prompt


@dataclass
class RunResult:
    method: str
    model: str
    text: str
    token_ids: list[int]
    summary: RunSummary
    steps: list[StepStats] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"method": self.method, "model": self.model, "text": self.text, "token_ids": self.token_ids,
                "summary": self.summary.to_json(), "steps": [s.to_json() for s in self.steps if s.round > 0]}


def model_config(name: str, progress: bool = True):
    """The HF config of a model (packaged ones are converted first): what the runtime probe reads."""
    from transformers import AutoConfig

    folder = resolve_model_dir(name, progress=progress)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - any unreadable config is one clear line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NanoSpecError(f"cannot read the config of model '{name}' from {folder}: {first_line}") from None


class Session:
    """dtype / device 'auto': chosen by measurement on this machine (machine.py), as is the CPU weight layout;
    `runtime` says what was chosen and why. `tree_choice()` is the measured default draft tree."""

    def __init__(self, model: str = "embedded", dtype: str = "auto", device: str = "auto",
                 head: str | None = None, progress: bool = True):
        self.model_name, self.head_source = model, head
        self.converted_before = is_converted(model)  # None: not a packaged model (cache.py's start-up line)
        self.runtime: RuntimeChoice = choose_runtime(model_config(model, progress), device=device, dtype=dtype)
        self.dtype = self.runtime.torch_dtype
        self.loaded = load_model(model, dtype=self.dtype, device=self.runtime.device, progress=progress,
                                 layout=(self.runtime.backbone_layout, self.runtime.head_layout))
        self.tokenizer = self.loaded.tokenizer
        self.target = TargetModel(self.loaded.hf_model)
        self._head = None
        self._head_dir: Path | None = None
        self._frequency = None
        self._tree_choice: TreeChoice | None = None
        self._copy_choices: dict[bool, CopyConfig] = {}
        self._warned_no_core = False

    # --- lazily loaded parts -----------------------------------------------------------------------------
    @property
    def head(self):
        """The EAGLE head: --head if given ('eagle3' / 'eagle2': the shipped head of that kind), else the default
        one shipped in assets/ for this model."""
        if self._head is None:
            from .models.eagle_checkpoint import load_head

            source = self.head_source
            if source is None or source in HEAD_KINDS:
                shipped = shipped_head_dir(self.loaded.key, source)
                if not (shipped / "config.json").exists():
                    raise NanoSpecError(f"no {source or 'EAGLE'} head ships for model {self.model_name!r}: "
                                        f"pass --head PATH|hub-id|random|{'|'.join(HEAD_KINDS)}")
                source = str(shipped)
            self._head = load_head(source, self.target)
            self._head_dir = Path(source) if Path(source).is_dir() else None
        return self._head

    @property
    def head_dir(self) -> Path | None:
        """The folder the head was loaded from (None for a hub id or 'random'); loads the head."""
        self.head  # noqa: B018 (loads it)
        return self._head_dir

    def tree_choice(self) -> TreeChoice:
        """The default draft tree: the one of highest expected tokens/s from this machine's measured verify and
        draft costs and the head's measured acceptance (decoding/tree_choice.py); TreeConfig() when the head has
        no acceptance table. Costs are measured once per machine, model, dtype, layout and head, then cached."""
        if self._tree_choice is None:
            ranks = load_acceptance(self._head_dir if self.head is not None else None)
            if ranks is None:
                self._tree_choice = TreeChoice.fixed(TreeConfig(), "fixed default: this head has no acceptance "
                                                     "table (python -m nanospec_core calibrate-head)")
            else:
                costs = self._tree_costs()
                verify, level = interpolate(costs["verify"]), interpolate(costs["level"])
                overhead = self._round_overhead(ranks, verify, level)
                self._tree_choice = choose_tree(ranks, verify, level, overhead_ms=overhead)
        return self._tree_choice

    def _round_overhead(self, ranks, verify, level) -> float:
        """ms a real round costs beyond the cost curves' draft + verify on this machine: one short NanoSpec decode
        of a fixed prompt at the curves' own choice, timed round by round (profiling.timed_rounds), then cached
        beside the curves."""
        from .machine import read_cache, write_cache
        from .profiling import round_overhead_ms, timed_rounds

        path = cache_dir() / "round_overhead.json"
        entries = read_cache(path)
        key = self.costs_key()
        if key not in entries:
            first = choose_tree(ranks, verify, level)
            steps = self.stream("nanospec", self.encode(CALIBRATION_PROMPT), GenerationConfig(max_new_tokens=48),
                                tree=first.tree)
            rows = timed_rounds(steps)
            entries[key] = {"overhead_ms": round_overhead_ms(rows, first.round_ms) if rows else 0.0,
                            "tree": vars(first.tree), "predicted_round_ms": first.round_ms, "rounds": rows}
            write_cache(path, entries)
        return float(entries[key]["overhead_ms"])

    def copy_choice(self, method: str) -> CopyConfig:
        """The copy branches' budget here (tree_choice.choose_copy): from the measured verify costs beside the chosen
        tree, or beside the plain step for lookup; CopyConfig() without an acceptance table (or without a head)."""
        lookup = method == "lookup"
        if lookup not in self._copy_choices:
            self._copy_choices[lookup] = self._choose_copy(lookup)
        return self._copy_choices[lookup]

    def _choose_copy(self, lookup: bool) -> CopyConfig:
        try:
            choice = self.tree_choice()
        except NanoSpecError:  # no head ships for this model: lookup still runs, on the fallback budget
            if lookup:
                return CopyConfig()
            raise
        if choice.expected_tau is None:
            return CopyConfig()
        verify = interpolate(self.tree_costs()["verify"])
        if lookup:  # no head: a round is one verify forward (plus the measured bookkeeping)
            return choose_copy(verify, verify(1) + choice.overhead_ms, 0, [])
        ranks, tree = load_acceptance(self._head_dir), choice.tree
        widths = best_widths(ranks, min(tree.depth, ranks.shape[1]), tree.top_k, tree.total_tokens)[-1][0]
        return choose_copy(verify, choice.round_ms, tree.total_tokens, held_depths(ranks, widths),
                           free_round_ms=verify(1) + choice.overhead_ms)

    def tree_prediction(self, tree: TreeConfig) -> TreeChoice | None:
        """The cost model's figures (tau, draft / verify / round ms, break-even tau) for `tree`: the chooser's own
        when it is the chosen tree; None when the head has no acceptance table."""
        choice = self.tree_choice()
        if choice.expected_tau is None:
            return None
        if vars(tree) == vars(choice.tree):
            return choice
        costs = self.tree_costs()
        return predict(load_acceptance(self._head_dir), interpolate(costs["verify"]), interpolate(costs["level"]), tree,
                       overhead_ms=choice.overhead_ms)

    def tree_costs(self) -> dict[str, dict[int, float]]:
        """This machine's cost curves for the loaded model and head (profiling.tree_costs), measured once, cached."""
        return self._tree_costs()

    def tree_costs_cached(self) -> bool | None:
        """Whether this machine's cost curves for the loaded model and head are already cached; None when the head
        has no acceptance table (a fixed tree: nothing to measure). Loads the head."""
        self.head  # noqa: B018 (the key names the head's folder)
        if load_acceptance(self._head_dir) is None:
            return None
        return self.costs_key() in read_cache(cache_dir() / "tree_costs.json")

    def costs_key(self) -> str:
        """What the cached costs of this session are keyed by: machine, torch, device, model, dtype, layout, head."""
        r = self.runtime
        return (f"{r.machine} | torch {torch.__version__} | {r.device} | {self.loaded.key} | {r.dtype} | "
                f"{r.backbone_layout},{r.head_layout} | head {self._head_dir}")

    def _tree_costs(self) -> dict[str, dict[int, float]]:
        from .machine import read_cache, write_cache
        from .profiling import tree_costs

        key = self.costs_key()
        path = cache_dir() / "tree_costs.json"
        entries = read_cache(path)
        if key not in entries:
            entries[key] = tree_costs(self.target, self.head)
            write_cache(path, entries)
        return {part: {int(n): ms for n, ms in curve.items()} for part, curve in entries[key].items()}

    @property
    def frequency(self) -> torch.Tensor | None:
        """Token ids by descending ShareGPT frequency for this tokenizer (static baseline, static core)."""
        if self._frequency is None:
            from .vocab.frequency import frequency_for

            self._frequency = frequency_for(self.loaded.key)
        return self._frequency

    # --- prompts and stop ids ----------------------------------------------------------------------------
    def encode(self, prompt: str, raw: bool = False) -> torch.Tensor:
        if not isinstance(prompt, str) or not prompt.strip():
            raise NanoSpecError("the prompt is empty")
        if raw or not getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    @property
    def stop_ids(self) -> frozenset[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, self.loaded.hf_model.generation_config.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- decoding ----------------------------------------------------------------------------------------
    def make_policy(self, method: str, vocab: VocabConfig):
        from .vocab.policies import make_policy

        head = self.head
        frequency = self.frequency
        name = DRAFT_METHODS[method]
        if frequency is None and (name == "static" or (name == "nanospec" and vocab.static_core > 0)):
            advice = f"run `python -m nanospec_core prepare --model {self.model_name}`"
            if name == "static":
                raise NanoSpecError(f"no frequency table for {self.loaded.key!r}: {advice}")
            # The static core is a refinement of the in-context set, not a requirement: run without it.
            if not self._warned_no_core:
                print(f"note: no frequency table for {self.loaded.key!r}, NanoSpec runs without its static core "
                      f"({advice})", file=sys.stderr)
                self._warned_no_core = True
            vocab = replace(vocab, static_core=0)
        return make_policy(name, head.lm_head_weight, vocab, self.target.vocab_size,
                           head_to_target=head.head_to_target, frequency=frequency)

    def stream(self, method: str, prompt_ids: torch.Tensor, gen: GenerationConfig, tree: TreeConfig | None = None,
               vocab: VocabConfig | None = None, copy: CopyConfig | None = None) -> Iterator[StepStats]:
        """Yield StepStats for one request with the given method (round 0 = prefill and first token). copy: the
        copy branches' settings for the copy methods (default: copy_choice)."""
        if method not in METHODS:
            raise NanoSpecError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if gen.max_new_tokens < 1:
            raise NanoSpecError("max_new_tokens must be at least 1")
        if gen.temperature < 0:
            raise NanoSpecError("temperature must be >= 0")
        request = Request(prompt_ids=prompt_ids, gen=gen, stop_ids=self.stop_ids)
        if method == "vanilla":
            return plain_decode(self.target, request)
        if method in ("hf", "hf-lookup"):
            lookup = PROMPT_LOOKUP_TOKENS if method == "hf-lookup" else 0
            return hf_generate(self.loaded.hf_model, request, prompt_lookup=lookup)
        copy = (copy or self.copy_choice(method)) if method in COPY_METHODS else None
        if method == "lookup":  # copy branches alone: no head, no vocabulary policy
            return speculative_decode(self.target, None, None, request, tree or TreeConfig(), copy=copy)
        policy = self.make_policy(method, vocab or VocabConfig())
        return speculative_decode(self.target, self.head, policy, request, tree or self.tree_choice().tree,
                                  copy=copy)

    def run(self, method: str, prompt_ids: torch.Tensor, gen: GenerationConfig, tree: TreeConfig | None = None,
            vocab: VocabConfig | None = None, copy: CopyConfig | None = None) -> RunResult:
        """Run one request to the end, timing the whole of it (prefill included) for tokens/s."""
        start = time.perf_counter()
        steps = list(self.stream(method, prompt_ids, gen, tree, vocab, copy))
        if self.target.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        token_ids = [t for s in steps for t in s.tokens]
        return RunResult(method=method, model=self.model_name, text=self.decode(token_ids), token_ids=token_ids,
                         summary=summarize(steps, wall), steps=steps)

    def generate(self, method: str, prompt: str, gen: GenerationConfig | None = None, raw: bool = False,
                 tree: TreeConfig | None = None, vocab: VocabConfig | None = None) -> RunResult:
        return self.run(method, self.encode(prompt, raw), gen or GenerationConfig(), tree, vocab)
