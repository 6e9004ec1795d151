"""The round view: one draft/verify round picked by the user, NanoSpec's tree next to EAGLE's at the same place.

A round is named by its number in the NanoSpec run. EAGLE's round "at the same place" is the one that started at
the same committed position (the same number of tokens already in the output): at temperature 0 both runs have the
same text up to there, so their trees grow from the same root and differ only in what each head could draft.
When the two runs' rounds are out of step (one committed more tokens earlier), EAGLE has no round starting there
and the view says so. The details line holds what that round cost and whether the target's bonus token was a miss,
an id outside the active set that no draft from it could have proposed.

    view = round_view(snapshot["nanospec"], snapshot["eagle"], 3, session.decode, full_vocab=151_936)
    view.nanospec_figure, view.eagle_figure, view.details
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..compare import RunTrace
from .locality_view import ORIGIN_LABELS
from ..metrics import StepStats
from .tree_plot import tree_figure


@dataclass
class RoundView:
    round: int
    nanospec_figure: object  # plotly Figure
    eagle_figure: object | None  # None: EAGLE has no round starting at that position
    details: str  # markdown


def starts(trace: RunTrace) -> dict[int, StepStats]:
    """Start position (tokens committed before the round, the prefill's first token included) -> draft round."""
    table, position = {}, 0
    for step in trace.steps:
        if step.round > 0 and step.tree is not None:
            table[position] = step
        position += len(step.tokens)
    return table


def drafted_rounds(trace: RunTrace) -> list[int]:
    """The round numbers that have a tree to draw."""
    return [step.round for step in trace.steps if step.round > 0 and step.tree is not None]


def _bonus_missed(step: StepStats) -> bool:
    """The bonus token (the last committed one) was outside the active set when the round was drafted."""
    return bool(step.hits) and len(step.hits) == len(step.tokens) and not step.hits[-1] and \
        step.tree is not None and step.tokens[-1] == step.tree.bonus


def _split(step: StepStats) -> str:
    return (f"draft {step.draft_ms:.1f} ms (backbone {step.backbone_ms:.1f} · lm head {step.lm_head_ms:.1f} · "
            f"gather {step.gather_ms:.1f} · tree {step.tree_ms:.1f}), verify {step.verify_ms:.1f} ms")


def _nanospec_line(step: StepStats, position: int, decode: Callable[[list[int]], str],
                   full_vocab: int | None) -> str:
    bonus = decode([step.tokens[-1]]) if step.tokens else ""
    scored = f"{step.active_vocab:,} active ids" if step.active_vocab is not None else "the full vocabulary"
    if step.fallback:
        scored = "the full vocabulary (coverage fallback)"
    of_full = f" of {full_vocab:,}" if full_vocab and step.active_vocab and not step.fallback else ""
    line = (f"**Round {step.round}** (output tokens {position}-{position + len(step.tokens) - 1}): NanoSpec drafted "
            f"{step.tree_size} nodes scoring {scored}{of_full}; the target committed {len(step.tokens)} "
            f"({len(step.tokens) - 1} accepted + the bonus {bonus!r}).")
    if _bonus_missed(step):
        line += f" **Miss:** {bonus!r} was not in the active set, so no draft could have proposed it."
    elif step.hits and step.origins and step.origins[-1]:
        origin = ORIGIN_LABELS.get(step.origins[-1], step.origins[-1])
        line += f" The bonus was in the active set (from: {origin}); the head ranked it too low to draft."
    return line + copy_line(step) + f" NanoSpec {_split(step)}."


def copy_line(step: StepStats) -> str:
    """What the round's copy branches added: nodes, their source span in the context, the tokens they committed."""
    sources = [s for s in (step.tree.sources or []) if s is not None] if step.tree is not None else []
    if not sources:
        return ""
    line = (f" Copy branches added {step.copy_nodes} nodes, copied from context positions "
            f"{min(sources)}-{max(sources)}; {step.copy_accepted} of the committed tokens came from them.")
    if step.head_free:
        line += (" The head drafted nothing this round: the copies alone were expected to commit faster than its "
                 "tree with them.")
    return line


def round_view(nanospec: RunTrace, eagle: RunTrace | None, round_number: int, decode: Callable[[list[int]], str],
               full_vocab: int | None = None) -> RoundView:
    """Figures and details for NanoSpec's round `round_number` (clamped to the rounds that have a tree)."""
    rounds = drafted_rounds(nanospec)
    if not rounds:
        raise ValueError("the NanoSpec run has no drafted round yet")
    round_number = min(max(int(round_number), rounds[0]), rounds[-1])
    position, step = next((p, s) for p, s in starts(nanospec).items() if s.round == round_number)
    token = lambda t: decode([t])  # noqa: E731
    figure = tree_figure(step.tree, token, title=f"NanoSpec, round {step.round}: {step.tree_size} drafted, "
                                                 f"{len(step.tree.path)} accepted + bonus",
                         bonus_missed=_bonus_missed(step))
    lines = [_nanospec_line(step, position, decode, full_vocab)]
    other = starts(eagle).get(position) if eagle is not None else None
    eagle_figure = None
    if other is not None:
        eagle_figure = tree_figure(other.tree, token, title=f"EAGLE (full vocabulary), its round {other.round} at "
                                                            f"the same position: {len(other.tree.path)} accepted")
        lines.append(f"EAGLE's round {other.round} starts at the same token: it committed {len(other.tokens)}; "
                     f"{_split(other)}.")
    elif eagle is not None:
        lines.append(f"EAGLE has no round starting at output token {position}: its rounds fell elsewhere "
                     "(it accepted a different number of tokens earlier).")
    return RoundView(step.round, figure, eagle_figure, "\n\n".join(lines))
