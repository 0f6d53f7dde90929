"""Incremental detokenisation of one answer: text pieces as tokens arrive, never half a character."""

from __future__ import annotations

import os
import re
from typing import Any

from road_vlm.generation.requests import TextCallback

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama / SentencePiece naming)


class IncrementalDetokenizer:
    """Turns one row's generated tokens into text pieces, with a prefix and a read offset (as vLLM and TGI do).

    Each ``push`` decodes only the window from the prefix offset, and emits what it adds beyond the already-read
    part, unless it ends in U+FFFD (a byte-fallback character still incomplete). Decoding a window rather than
    every token so far keeps earlier text fixed, so a stream never stalls on a changed prefix; ``finish`` flushes
    the rest, and the answer's text is the concatenation of its pieces, so streamed and non-streamed text are the
    same string.

    ``stop`` strings end the answer before their first occurrence (``stopped`` turns True): text that could be
    the start of a stop string is held back until it is known not to be, so a stream never shows what the final
    answer cuts.
    """

    def __init__(self, tokenizer: Any, on_text: TextCallback | None = None, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.stop = stop
        self.stopped = False
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self._prefix_offset = 0  # where the decoding window starts
        self._read_offset = 0  # tokens up to here are already decoded
        self._held = ""  # decoded text not yet emitted: it may be the start of a stop string

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def push(self, token: int) -> None:
        self.tokens.append(int(token))
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)
        self._publish("", final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _is_byte_piece(self, token_id: int) -> bool:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    def _emit(self, *, final: bool) -> None:
        tokens, start, read = self.tokens, self._prefix_offset, self._read_offset
        if not tokens or (final and read == len(tokens)):
            return
        if not final and self._is_byte_piece(tokens[-1]):
            # A run of byte-fallback tokens is decoded as one group, and one invalid byte turns the whole group
            # into U+FFFD: text from an open group may still change, so wait until a normal token closes it.
            return
        already = self._decode(tokens[start:read])
        window = self._decode(tokens[start:])
        if not final and (window.endswith("\ufffd") or len(window) <= len(already)):
            return  # an incomplete character, or nothing new yet (e.g. a lone space-marker token)
        # The window extends the read part, so its text extends the read text (with these decoders); were it not
        # to, emit only what differs from the common prefix rather than repeat or drop text.
        piece = window[len(os.path.commonprefix([already, window])):]
        self._prefix_offset, self._read_offset = read, len(tokens)
        self._publish(piece, final=final)

    def _publish(self, piece: str, *, final: bool) -> None:
        """Emit ``piece``, less what may begin a stop string (held for the next piece); cut at a stop string."""
        if self.stopped:
            return
        if self.stop:
            held = self._held + piece
            hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
            if hits:
                piece, self._held, self.stopped = held[:min(hits)], "", True
            else:
                keep = 0 if final else _stop_prefix_length(held, self.stop)
                piece, self._held = held[:len(held) - keep], held[len(held) - keep:]
        if not piece:
            return
        self.pieces.append(piece)
        if self.on_text is not None:
            self.on_text(piece)


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that is the beginning of a stop string."""
    for length in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(text[-length:]) for s in stops):
            return length
    return 0
