"""Token ids and per-token modality ids of interleaved image-text sequences (Emu2's format).

An image in a sequence is ``[IMG]`` + N x ``<image>`` + ``[/IMG]``. The input embedding at each
``<image>`` is ``project_up`` of that slot's visual feature; the hidden state at ``[IMG]`` and at
the first N-1 slots regresses the next slot's feature through ``project_down``. The special
tokens sit right after the text vocabulary.

Modality ids (they route the adapters' B heads): 0 = text (including ``[/IMG]``),
1 = the image span (``[IMG]`` and its N slots: the positions that read or predict image slots),
-1 = padding (no adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT, IMAGE, PAD_MODALITY = 0, 1, -1
NUM_SPECIAL = 4


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens for a text vocabulary of ``base_vocab`` ids."""

    base_vocab: int

    def __post_init__(self):
        if not isinstance(self.base_vocab, int) or self.base_vocab < 1:
            raise ValueError(f"base_vocab must be a positive int, got {self.base_vocab!r}")

    @property
    def pad(self) -> int:
        return self.base_vocab

    @property
    def img_start(self) -> int:
        """``[IMG]``"""
        return self.base_vocab + 1

    @property
    def img_end(self) -> int:
        """``[/IMG]``"""
        return self.base_vocab + 2

    @property
    def img_slot(self) -> int:
        """``<image>``"""
        return self.base_vocab + 3

    @property
    def vocab_size(self) -> int:
        """Text vocabulary plus the special tokens (before padding for tensor parallelism)."""
        return self.base_vocab + NUM_SPECIAL

    def is_text_target(self, token: int) -> bool:
        """Tokens the cross-entropy predicts: text and ``[/IMG]``-free text only (Emu1 masks
        ``[PAD]``, ``<image>``, ``[IMG]`` and ``[/IMG]`` out of the text loss)."""
        return token < self.base_vocab


def padded_vocab_size(vocab_size: int, multiple: int = 128) -> int:
    """Vocabulary rounded up so it splits over any TP size dividing ``multiple``."""
    return -(-vocab_size // multiple) * multiple
