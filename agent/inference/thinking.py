"""Remove MedGemma's thinking blocks and stray special tokens from generated text, whole or streamed.

Shared by both MedGemma backends (in-process and OpenAI-compatible), so an answer reads the same
whichever produced it. Kept free of torch and transformers: the remote backend runs without them.

MedGemma (1.5) may think before answering, between ``<unused94>`` and ``<unused95>``; the
clinician sees only the answer. :func:`strip_thinking` cleans a finished text;
:class:`StreamCleaner` does the same to text arriving in pieces, holding back any tail that could
still turn into a marker, so nothing between the markers is ever yielded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: MedGemma (1.5) may think before answering, between these two markers.
THINKING_START = "<unused94>"
THINKING_END = "<unused95>"
#: Gemma's special tokens that may reach decoded text (a server decoding with special tokens kept).
GEMMA_SPECIAL_TEXTS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>")

_THINKING_BLOCK = re.compile(re.escape(THINKING_START) + r".*?" + re.escape(THINKING_END), re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove MedGemma's thinking blocks from decoded text, keeping only the answer.

    Handles a complete block (``<unused94>...<unused95>``), several blocks, a block cut off by
    ``max_new_tokens`` (everything from an unmatched ``<unused94>`` on is dropped), and a closing
    marker without its opener (the opener sat in the prompt: everything up to it is dropped).

    Args:
        text: generated text decoded with the special tokens still visible.

    Returns:
        The text outside thinking blocks, stripped of surrounding whitespace.
    """
    text = _THINKING_BLOCK.sub("", text)
    if THINKING_END in text:
        text = text.rsplit(THINKING_END, 1)[1]
    if THINKING_START in text:
        text = text.split(THINKING_START, 1)[0]
    return text.strip()


def clean_text(text: str, special_texts: Iterable[str] = GEMMA_SPECIAL_TEXTS) -> str:
    """Return the answer in a finished text: thinking stripped, special tokens removed, trimmed."""
    text = strip_thinking(text)
    for special in sorted(set(special_texts) - {THINKING_START, THINKING_END}, key=len, reverse=True):
        text = text.replace(special, "")
    return text.strip()


class StreamCleaner:
    """Clean streamed text deltas the way :func:`clean_text` cleans the whole text.

    Feed each delta to :meth:`feed` and yield what it returns; call :meth:`finish` at the end.
    The concatenation of everything returned equals ``clean_text(all deltas joined)`` for any
    split of the text into deltas, with one exception that streaming cannot honour: a closing
    marker without an opener cannot take back text already yielded, so only the marker itself is
    dropped there (MedGemma's prompts never open a thinking block, so this does not arise).

    Held back until it is safe: a tail that is a prefix of a marker or special token (it may
    complete in the next delta), leading whitespace (the answer is trimmed) and trailing
    whitespace (it is kept only if more answer follows).
    """

    def __init__(self, special_texts: Iterable[str] = GEMMA_SPECIAL_TEXTS) -> None:
        """Prepare a cleaner for one generation.

        Args:
            special_texts: special-token texts removed from the answer (thinking markers are
                always handled, whether listed or not).
        """
        self._specials = sorted(set(special_texts) - {THINKING_START, THINKING_END}, key=len, reverse=True)
        self._markers = [THINKING_START, THINKING_END, *self._specials]
        self._pending = ""  # raw text not yet decided on
        self._space = ""  # whitespace seen after the last yielded answer text
        self._thinking = False
        self._started = False

    def feed(self, delta: str) -> str:
        """Take one delta; return the answer text that is now safe to show (may be empty)."""
        self._pending += delta
        out: list[str] = []
        while self._pending:
            if self._thinking:
                end = self._pending.find(THINKING_END)
                if end < 0:
                    # Keep only a tail that may complete the closing marker; the rest is thinking.
                    self._pending = self._pending[-(len(THINKING_END) - 1) :]
                    break
                self._pending = self._pending[end + len(THINKING_END) :]
                self._thinking = False
                continue
            index, marker = self._next_marker()
            if marker is None:
                safe = len(self._pending) - self._partial_marker_length()
                out.append(self._answer(self._pending[:safe]))
                self._pending = self._pending[safe:]
                break
            out.append(self._answer(self._pending[:index]))
            self._pending = self._pending[index + len(marker) :]
            if marker == THINKING_START:
                self._thinking = True
        return "".join(out)

    def finish(self) -> str:
        """Return what is left once the stream has ended (an unfinished marker prefix is answer text)."""
        if self._thinking:
            self._pending = ""
            return ""
        rest, self._pending = self._pending, ""
        text = self._answer(rest)
        self._space = ""  # trailing whitespace is trimmed
        return text

    def _next_marker(self) -> tuple[int, str | None]:
        found: tuple[int, str | None] = (-1, None)
        for marker in self._markers:
            index = self._pending.find(marker)
            if index >= 0 and (found[1] is None or index < found[0]):
                found = (index, marker)
        return found

    def _partial_marker_length(self) -> int:
        # The longest tail of the pending text that is a proper prefix of some marker.
        longest = 0
        for marker in self._markers:
            for size in range(min(len(marker) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(marker[:size]):
                    longest = size
                    break
        return longest

    def _answer(self, text: str) -> str:
        # Whitespace is held until answer text follows it: leading and trailing whitespace of the
        # whole answer is dropped, inner whitespace kept exactly.
        if not text:
            return ""
        stripped = text.rstrip()
        if not stripped:
            if self._started:
                self._space += text
            return ""
        if not self._started:
            stripped = stripped.lstrip()
            out = stripped
            self._started = True
        else:
            out = self._space + stripped
        self._space = text[len(text.rstrip()) :]
        return out
