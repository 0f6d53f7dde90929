"""lm-evaluation-harness against the real server: a generative task through ``local-chat-completions`` (which
always sends ``seed``) and a loglikelihood task through ``local-completions`` (token-id prompts, ``echo`` +
``logprobs``, sliced by lm-eval's own context length). Both tasks are local files; nothing comes from a hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

DOCS = [
    {"question": "What color is the square?", "answer": "red", "choices": [" red", " green", " blue"], "label": 0},
    {"question": "Where is the circle?", "answer": "left", "choices": [" left", " right"], "label": 1},
    {"question": "How many shapes are there?", "answer": "two", "choices": [" one", " two", " three"], "label": 1},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "gen.yaml").write_text(
        "task: road_vlm_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "choice.yaml").write_text(
        "task: road_vlm_tiny_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return root


def _evaluate(tasks: Path, model: str, model_args: dict, task: str, **kwargs) -> dict:
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    return simple_evaluate(model=model, model_args=args, tasks=[task], task_manager=TaskManager(
        include_path=str(tasks)), log_samples=True, batch_size=1, **kwargs)


def test_local_chat_completions_generates_what_the_server_answers(api_server, tasks):
    out = _evaluate(tasks, "local-chat-completions",
                    {"model": "road4", "base_url": f"{api_server}/v1/chat/completions", "num_concurrent": 1,
                     "max_retries": 1}, "road_vlm_tiny_gen", apply_chat_template=True)
    samples = out["samples"]["road_vlm_tiny_gen"]
    assert len(samples) == len(DOCS)
    for sample in samples:
        question = sample["doc"]["question"]
        direct = httpx.post(f"{api_server}/v1/chat/completions", timeout=120, json={
            "model": "road4", "messages": [{"role": "user", "content": question}], "max_tokens": 6,
            "temperature": 0, "stop": ["\n\n"], "seed": 1234}).json()
        assert sample["resps"][0][0] == direct["choices"][0]["message"]["content"]
    assert "exact_match,none" in out["results"]["road_vlm_tiny_gen"]


def test_local_completions_loglikelihoods_are_the_models(api_server, tasks, tiny_llava_dir, engine):
    out = _evaluate(tasks, "local-completions",
                    {"model": "base", "base_url": f"{api_server}/v1/completions", "tokenizer_backend": "huggingface",
                     "tokenizer": str(tiny_llava_dir), "tokenized_requests": True, "max_length": 1024,
                     "num_concurrent": 1, "max_retries": 1}, "road_vlm_tiny_choice")
    samples = out["samples"]["road_vlm_tiny_choice"]
    tokenizer = engine.processor.tokenizer
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            loglikelihood, _ = resp[0]
            # lm-eval's split: the context's tokens, then what the whole string adds (no BOS: sent as ids).
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(engine.model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            expected = sum(float(logprobs[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))
            assert float(loglikelihood) == pytest.approx(expected, abs=1e-3)
            checked += 1
    assert checked == sum(len(d["choices"]) for d in DOCS)
    assert "acc,none" in out["results"]["road_vlm_tiny_choice"]
