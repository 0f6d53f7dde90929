"""Terminal chat with a (tuned) LLaVA-1.5 model: multi-turn, streamed, one image per conversation.

Interactive commands: ``/image PATH`` (load an image; a new image starts a new conversation, as in LLaVA),
``/reset`` (forget the conversation, keep the image), ``/quit``, ``/help``. Bad input (a missing or non-image
file, an over-long conversation) prints an error and the chat goes on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from road_vlm.data.images import ImageLoadError, load_image
from road_vlm.data.template import render_prompt
from road_vlm.model import LoadedVLM

from road_vlm.generation import GenerationRequest, GenerationResult, PromptTooLongError, SamplingParams, TextCallback
from road_vlm.generation import generate_batch, prepare_prompt

HELP = """commands:
  /image PATH   use this image (starts a new conversation)
  /reset        start a new conversation (keeps the image)
  /quit         leave (also Ctrl-D)
  /help         this text"""


@dataclass
class ChatSession:
    """A conversation with one loaded model: history of finished turns, the current image, sampling settings."""

    loaded: LoadedVLM
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # the adapter directory, for display / JSON output only
    image: Image.Image | None = None
    image_path: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    last_prompt_ids: list[int] = field(default_factory=list)

    def set_image(self, path: str | Path) -> None:
        """Load ``path`` (ImageLoadError names it) and start a new conversation about it."""
        image = load_image(path)
        self.image, self.image_path = image, str(path)
        self.history = []

    def reset(self) -> None:
        self.history = []

    def prompt_text(self, question: str) -> str:
        """The rendered prompt for ``question`` after the current history (``<image>`` marks the image)."""
        return render_prompt(self.history, question, has_image=self.image is not None)

    def ask(self, question: str, on_text: TextCallback | None = None) -> GenerationResult:
        """Answer ``question`` in the current conversation, streaming text to ``on_text``; the turn is added to
        the history only when generation completes."""
        model, processor, prompt_format = self.loaded
        prompt = prepare_prompt(model, processor, prompt_format, self.history, question, self.image)
        self.last_prompt_ids = list(prompt.input_ids)
        request = GenerationRequest(prompt=prompt, sampling=self.sampling, on_text=on_text)
        # The model as loaded: its adapter is the active one (or merged into the weights).
        (result,) = generate_batch(model, processor.tokenizer, [request])
        self.history.append((question, result.text))
        return result


def answer_once(session: ChatSession, question: str, *, as_json: bool = False, out: IO[str] | None = None) -> int:
    """Non-interactive mode: answer one question (streamed, or as one JSON object) and return an exit code."""
    out = sys.stdout if out is None else out
    prompt = session.prompt_text(question)

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    result = session.ask(question, on_text=None if as_json else stream)
    if as_json:
        payload: dict[str, Any] = {
            "answer": result.text,
            "prompt": prompt,
            "adapter": session.adapter,
            "image": session.image_path,
            "tokens": result.completion_tokens,
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
        }
        out.write(json.dumps(payload, ensure_ascii=False) + "\n")
    else:
        out.write("\n")
    out.flush()
    return 0


def run_interactive(session: ChatSession, *, inp: IO[str] | None = None, out: IO[str] | None = None) -> int:
    """Read questions and commands from ``inp`` until /quit or end of input; errors never end the chat."""
    inp = sys.stdin if inp is None else inp
    out = sys.stdout if out is None else out
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()

    image_note = f" image: {session.image_path}" if session.image_path else " no image (use /image PATH)"
    say(f"road_vlm chat — adapter: {session.adapter or 'none'};{image_note}. /help for commands.")
    while True:
        out.write("USER> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            say("")
            return 0
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            argument = argument.strip()
            if len(argument) > 1 and argument[0] == argument[-1] and argument[0] in "'\"":
                argument = argument[1:-1]  # a pasted, quoted path
            if command in ("/quit", "/exit"):
                return 0
            if command == "/help":
                say(HELP)
            elif command == "/reset":
                session.reset()
                say("[new conversation]")
            elif command == "/image":
                if not argument:
                    say("error: usage: /image PATH")
                    continue
                try:
                    session.set_image(argument)
                except ImageLoadError as err:
                    say(f"error: {err}")
                    continue
                say(f"[image {argument} loaded; new conversation]")
            else:
                say(f"error: unknown command {command}; /help lists the commands")
            continue
        out.write("ASSISTANT: ")
        out.flush()
        try:
            session.ask(text, on_text=stream)
        except PromptTooLongError as err:
            say(f"\nerror: {err}")
            continue
        except KeyboardInterrupt:
            say("\n[interrupted; this turn is not kept]")
            continue
        say("")
