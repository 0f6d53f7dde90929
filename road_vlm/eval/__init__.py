"""LLaVA-1.5 benchmark evaluation: GQA, ScienceQA-IMG, TextVQA and POPE with the paper's prompts,
generation settings and scorers."""

from road_vlm.eval.api import evaluate, resolve_checkpoints
from road_vlm.eval.benchmarks import BENCHMARKS, REFERENCE_ROWS
from road_vlm.eval.common import EvalDataError, EvalQuestion

__all__ = ["evaluate", "resolve_checkpoints", "BENCHMARKS", "REFERENCE_ROWS", "EvalDataError", "EvalQuestion"]
