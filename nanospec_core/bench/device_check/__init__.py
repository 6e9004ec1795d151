"""The GPU check (scripts/gpu_check.py): what a lent CUDA machine must confirm about NanoSpec, in sections that each
pass, fail or skip on their own and say why (report.py), at the embedded target's shape or, with --quick, at small
shapes that run the same code on a CPU in CI (shapes.py).

    correctness.py     greedy NanoSpec == plain greedy (float32), sampling's distribution, device reads and syncs
    overlap.py         the lm-head row gather on its side stream overlapping the head backbone (events, profiler)
    draft_cost.py      draft time per round (backbone / lm head / gather), EAGLE vs NanoSpec, two vocabularies;
                       verify cost per tree size; the lm-head step eager vs replayed from a CUDA graph
    plugin_scoring.py  the vLLM plugin's fixed-shape scoring (torch only) captured once and replayed as sets change
    compat.py          the torch / transformers APIs these paths use, checked against the running versions
    plugin_engine.py   the plugin inside vLLM: only where vLLM's CUDA build is installed (skipped on the lent machine)
"""
