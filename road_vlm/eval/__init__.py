"""Benchmark evaluation: GQA, ScienceQA-IMG, TextVQA and POPE exactly as LLaVA-1.5 scores them (its prompts,
generation settings, answer files and scorers), so a checkpoint's numbers compare with the paper's.

- ``gqa`` / ``scienceqa`` / ``textvqa`` / ``pope``: one module per benchmark (its files, prompt and metric),
  listed in ``benchmarks``; ``common``: the question record and the file readers they share;
  ``vqa_normalize``: TextVQA's answer normalisation;
- ``runner``: batched, sharded, resumable generation of answers; ``predictions``: the answer files;
- ``api``: :func:`evaluate` over a base and its checkpoints; ``report``: results.json / .md / .png;
- ``validate``: a data root checked before any GPU time is spent; ``commands``: ``road-vlm eval`` and ``score``.
"""

from road_vlm.eval.api import evaluate, resolve_checkpoints
from road_vlm.eval.benchmarks import BENCHMARKS, REFERENCE_ROWS
from road_vlm.eval.common import EvalDataError, EvalQuestion

__all__ = ["evaluate", "resolve_checkpoints", "BENCHMARKS", "REFERENCE_ROWS", "EvalDataError", "EvalQuestion"]
