"""A recording that arrives as pieces while it is made: how the pieces are named in their
folder, how the folder says the recording is whole, and a reader over the pieces in order.

The browser's MediaRecorder hands over consecutive bytes of one WebM (or Ogg) stream every few
seconds; only the first piece holds the header, so no piece decodes alone. The reader joins
them as they come, waiting for the next one, until the seal says how many there are."""

from __future__ import annotations

import json
import time
from pathlib import Path

SEAL_NAME = "sealed.json"
# How often a reader waiting for the next piece looks for it.
_POLL_SECONDS = 0.2


def piece_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.piece"


def pieces_seal(folder: Path, count: int) -> None:
    """Say that the recording is its first `count` pieces (written aside and renamed: a reader
    sees the whole seal or none)."""
    partial = folder / (SEAL_NAME + ".partial")
    partial.write_text(json.dumps({"pieces": count}))
    partial.replace(folder / SEAL_NAME)


def pieces_sealed(folder: Path) -> int | None:
    """How many pieces the sealed recording has; None while it may still grow."""
    try:
        return int(json.loads((folder / SEAL_NAME).read_text())["pieces"])
    except FileNotFoundError:
        return None


class PieceReader:
    """A file-like `read` over the pieces of `folder` in order, waiting for each; end of file
    once the seal's last piece is read. Only names this module makes are opened: a piece index
    is a number, never a path from outside."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.next_index = 0
        self._buffer = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self._buffer:
            path = piece_path(self.folder, self.next_index)
            if path.exists():
                self._buffer = memoryview(path.read_bytes())
                self.next_index += 1
                continue
            count = pieces_sealed(self.folder)
            if count is not None and self.next_index >= count:
                return b""
            time.sleep(_POLL_SECONDS)
        size = len(self._buffer) if size < 0 else size
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        return bytes(chunk)
