"""The client libraries people point at a local OpenAI-compatible server, against the real server on loopback:
the openai SDK, LangChain's ChatOpenAI and LiteLLM. Each answer is checked against the server's own answer to the
same request sent as plain JSON, so a client that silently dropped or renamed a field would fail."""

from __future__ import annotations

import os
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel

QUESTION = "Describe the image briefly."
KEY = "not-needed"  # the test server has no API key; the clients insist on one


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


def _direct(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "road4", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def client(api_server):
    import openai

    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_sdk_seed_makes_an_answer_repeat_and_n_gives_seeded_rows(client):
    ask = dict(model="road4", messages=[{"role": "user", "content": QUESTION}], temperature=1.5, max_tokens=8)
    first = client.chat.completions.create(seed=42, **ask)
    again = client.chat.completions.create(seed=42, **ask)
    other = client.chat.completions.create(seed=43, **ask)
    assert first.choices[0].message.content == again.choices[0].message.content
    pair = client.chat.completions.create(seed=42, n=2, **ask)
    assert [c.message.content for c in pair.choices] == [first.choices[0].message.content,
                                                         other.choices[0].message.content]


def test_openai_sdk_logprobs(client):
    response = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, logprobs=True, top_logprobs=2,
        logit_bias={"2": -100})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


def test_openai_sdk_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model="road4", messages=[{"role": "system", "content": "Answer in JSON."},
                                 {"role": "user", "content": "Is the square red?"}],
        response_format=Verdict, max_tokens=40)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Verdict)


def test_openai_sdk_completions_and_streaming(client, api_server):
    streamed = client.chat.completions.create(model="road4", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _direct(api_server, messages=[{"role": "user", "content": QUESTION}],
                           max_tokens=8)["choices"][0]["message"]["content"]
    assert chunks[-1].usage.completion_tokens > 0
    completion = client.completions.create(model="base", prompt="The red square", max_tokens=4, echo=True)
    assert completion.choices[0].text.startswith("The red square")


@pytest.fixture(scope="module")
def chat_model(api_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{api_server}/v1", api_key=KEY, model="road4", max_tokens=8,
                                       temperature=0, max_retries=0, timeout=120)


def test_langchain_system_message_and_streaming(chat_model, api_server):
    from langchain_core.messages import HumanMessage, SystemMessage

    messages = [SystemMessage("You are a pirate."), HumanMessage(QUESTION)]
    answer = chat_model.invoke(messages)
    expected = _direct(api_server, messages=[{"role": "system", "content": "You are a pirate."},
                                             {"role": "user", "content": QUESTION}], max_tokens=8)
    assert answer.content == expected["choices"][0]["message"]["content"]
    pieces = [chunk.content for chunk in chat_model.stream(messages)]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == answer.content


def test_langchain_with_structured_output(api_server):
    from langchain_openai import ChatOpenAI

    # No max_tokens: the answer may run to the server's cap, which leaves room for the whole JSON.
    model = ChatOpenAI(base_url=f"{api_server}/v1", api_key=KEY, model="road4", max_retries=0, timeout=120)
    structured = model.with_structured_output(Verdict)
    verdict = structured.invoke("Is the square red? Answer in JSON.")
    assert isinstance(verdict, Verdict)


def test_litellm_completion(api_server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of the price list
    import litellm

    response = litellm.completion(model="openai/road4", api_base=f"{api_server}/v1", api_key=KEY,
                                  messages=[{"role": "user", "content": QUESTION}], max_tokens=8, seed=7,
                                  temperature=1.2, num_retries=0, timeout=120)
    expected = _direct(api_server, messages=[{"role": "user", "content": QUESTION}], max_tokens=8, seed=7,
                       temperature=1.2)
    assert response.choices[0].message.content == expected["choices"][0]["message"]["content"]
