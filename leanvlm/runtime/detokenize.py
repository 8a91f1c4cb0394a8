"""Incremental detokenisation and stop strings: each new token costs a decode of a few tokens, not of the
whole generated text (what a server's decode step would otherwise pay per request per token)."""

from __future__ import annotations


class TextState:
    """Tokens of one request -> its text, finish reason and the part of the text safe to stream.

    The decode window starts one token before the unread ones (`prefix`), so tokenizers that drop a leading
    space at the start of a decode (SentencePiece's Metaspace) join pieces as a full decode would, and text
    is only appended once the window ends in a whole character (no U+FFFD from a split UTF-8 sequence)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos: frozenset[int] | set[int] = frozenset(),
                 max_new_tokens: int | None = None, ignore_eos: bool = False):
        self.tokenizer, self.stop, self.eos = tokenizer, tuple(stop), eos
        self.max_new_tokens, self.ignore_eos = max_new_tokens, ignore_eos
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self._prefix = 0  # first token of the decode window
        self._read = 0  # tokens whose text is already in self.text
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        """Add one generated token; sets `finish` to "eos", "stop" or "length" when the request is done."""
        if self.finish:
            return
        token = int(token)
        self.tokens.append(token)
        if token in self.eos and not self.ignore_eos:
            self.finish = "eos"
        window = self.tokens[self._prefix:]
        before = self._decode(self.tokens[self._prefix: self._read]) if self._read > self._prefix else ""
        now = self._decode(window)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = len(self.text)
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)
            self._check_stop(start)
        elif self.finish and now.startswith(before):  # the last token: keep what it decodes to, even a U+FFFD
            self.text += now[len(before):]
        if not self.finish and self.max_new_tokens is not None and len(self.tokens) >= self.max_new_tokens:
            self.finish = "length"
            self._flush()

    def _flush(self) -> None:
        """At a length finish: text of trailing tokens that did not yet decode to a whole character."""
        if self._read < len(self.tokens):
            before = self._decode(self.tokens[self._prefix: self._read]) if self._read > self._prefix else ""
            now = self._decode(self.tokens[self._prefix:])
            if now.startswith(before):
                start = len(self.text)
                self.text += now[len(before):]
                self._read = len(self.tokens)
                self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        """Look for stop strings only where the new text could complete one."""
        if not self.stop:
            return
        lo = max(0, start - self._longest_stop + 1)
        hits = [at for at in (self.text.find(s, lo) for s in self.stop) if at >= 0]
        if hits:
            self.text, self.finish = self.text[: min(hits)], "stop"

    def safe_text(self) -> str:
        """Text that can be streamed now: no possible start of a stop string at its end."""
        if self.finish or not self.stop:
            return self.text
        text = self.text
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        return text[: len(text) - hold]
