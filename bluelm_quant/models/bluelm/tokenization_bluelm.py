"""BlueLMTokenizer: the slow SentencePiece tokenizer of BlueLM (docs/BLUELM.md section 3).

SentencePiece BPE with byte fallback; BOS added, EOS not. The chat markers `[|Human|]:` and
`[|AI|]:` (and `[SEH]` / `[SEA]` in the 32K models) are added tokens whose ids come from the
directory's tokenizer_config.json (`added_tokens_decoder`) or added_tokens.json, never from a
guess: the real files put them at 100000.., a test model with a small vocabulary elsewhere.
"""
from __future__ import annotations

import os

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from .chat_format import AI, CHAT_MARKERS, HUMAN

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class BlueLMTokenizerError(ValueError):
    """The tokenizer files are missing or inconsistent.

    A ValueError on purpose: transformers' from_pretrained replaces any OSError raised by a
    tokenizer constructor with a generic message that hides which file is missing.
    """


class BlueLMTokenizer(SentencePieceBackend):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"  # decoder-only: batched prompts must end at the same position

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            where = kwargs.get("name_or_path") or "the tokenizer directory"
            raise BlueLMTokenizerError(
                f"BlueLMTokenizer needs the SentencePiece model 'tokenizer.model' in {where} "
                f"(got vocab_file={vocab_file!r}); copy tokenizer.model from the original BlueLM checkpoint"
            )
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        pattern = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}
        kwargs.setdefault("special_tokens_pattern", pattern[(add_bos_token, add_eos_token)])
        # legacy=True: encode text exactly as the SentencePiece model was trained (dummy prefix kept).
        kwargs.setdefault("legacy", True)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )
        # Directories written by other tools list the chat markers as plain added tokens.
        special = set(self.all_special_tokens)
        # Control markers: never part of a reply, so skip_special_tokens must drop them.
        for content in CHAT_MARKERS:
            if content in self._added_tokens_encoder and content not in special:
                self._added_tokens_decoder[self._added_tokens_encoder[content]].special = True
                self._extra_special_tokens.append(content)

    def _convert_id_to_token(self, index: int) -> str:
        size = self.sp_model.get_piece_size()
        if not 0 <= index < size:
            raise BlueLMTokenizerError(
                f"token id {index} is neither in the SentencePiece vocabulary (0..{size - 1}) nor an added token"
            )
        return self.sp_model.IdToPiece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces through SentencePiece so byte-fallback pieces (<0xE4>...) become UTF-8 text;
        added tokens, which SentencePiece does not know, are copied verbatim."""
        out: list[str] = []
        pieces: list[str] = []
        for token in tokens:
            if token in self._added_tokens_encoder and self._added_tokens_encoder[token] >= self.vocab_size:
                if pieces:
                    out.append(self.sp_model.decode_pieces(pieces))
                    pieces = []
                out.append(token)
            else:
                pieces.append(token)
        if pieces:
            out.append(self.sp_model.decode_pieces(pieces))
        return "".join(out)

    @property
    def human_token_id(self) -> int | None:
        return self._added_tokens_encoder.get(HUMAN)

    @property
    def ai_token_id(self) -> int | None:
        return self._added_tokens_encoder.get(AI)


__all__ = ["BlueLMTokenizer", "BlueLMTokenizerError"]
