"""Multi-turn chat on top of `model.generate`: BlueLM's prompt format, or the tokenizer's chat
template for other models (e.g. SmolLM2).

On the CPU, a quantized model generates inside generate.model_decode_threads (torch's own ops on
one thread, the quantized kernels on `threads`); `fast=True` adds a static KV cache and the
compiled decode step (generate.fast_generate_config; the first turn compiles: a minute or more on
a small machine).

Every turn re-encodes the whole conversation and generates with a fresh KV cache. Reusing a
cache across turns is what breaks multi-turn chat (docs/BLUELM.md section 5: gibberish after the first
turn): the re-encoded history never matches the cached tokens exactly, and stale positions or
masks silently corrupt attention. Re-encoding costs one prefill per turn; it is always correct.

BlueLM format (docs/BLUELM.md section 3), BOS added by the tokenizer:
    [|Human|]:{q1}[|AI|]:{a1}</s>[|Human|]:{q2}[|AI|]:
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .generate import fast_generate_config, model_decode_threads
from .models.bluelm import chat_format
from .models.bluelm.chat_format import AI, HUMAN
from .placement import model_device

log = logging.getLogger(__name__)

# docs/BLUELM.md demo defaults. top_p / top_k / temperature only apply when do_sample=True.
DEFAULT_GENERATION = dict(max_new_tokens=512, do_sample=False, repetition_penalty=1.1, top_p=0.8, top_k=50,
                          temperature=1.0)
SAMPLING_ONLY = ("top_p", "top_k", "temperature")

History = Sequence[tuple[str, str]]


class ChatError(ValueError):
    """The conversation cannot be run with this model/tokenizer."""


@dataclass
class ChatPrompt:
    input_ids: list[int]
    history: list[tuple[str, str]]  # the turns kept in the prompt (oldest ones may be dropped)
    dropped_turns: int
    max_new_tokens: int
    notice: str | None  # what was trimmed or shortened, for the user


def is_bluelm(model) -> bool:
    return getattr(model.config, "model_type", None) == "BlueLM"


def context_length(model) -> int:
    config = model.config
    length = getattr(config, "context_length", None) or getattr(config, "max_position_embeddings", None)
    if not length:
        raise ChatError(f"{type(config).__name__} gives no max_position_embeddings; cannot guard the context")
    return int(length)


def bluelm_prompt(query: str, history: History = ()) -> str:
    """The BlueLM chat prompt text, without BOS (the tokenizer adds it)."""
    return chat_format.prompt(query, history)


def _require_single_token(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ChatError(
            f"the tokenizer splits the BlueLM chat marker {token!r} into {ids}; its directory must list it as an "
            "added token (tokenizer_config.json added_tokens_decoder, id 100000 / 100001 in the published files)"
        )
    return ids[0]


def encode_prompt(model, tokenizer, query: str, history: History = ()) -> list[int]:
    if is_bluelm(model):
        _require_single_token(tokenizer, HUMAN)
        _require_single_token(tokenizer, AI)
        return tokenizer.encode(bluelm_prompt(query, history))
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(
            f"model_type {model.config.model_type!r} is not BlueLM and its tokenizer has no chat_template; "
            "set tokenizer.chat_template (a Jinja template) to chat with it"
        )
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def stop_token_ids(model, tokenizer) -> list[int]:
    """`</s>` (the tokenizer's EOS) plus, for BlueLM, `[|Human|]:`: the model starting the next
    question means its answer is over."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        ids += source if isinstance(source, list) else [source]
    if is_bluelm(model):
        ids.append(_require_single_token(tokenizer, HUMAN))
    return sorted({i for i in ids if i is not None})


def prepare_prompt(model, tokenizer, query: str, history: History, max_new_tokens: int) -> ChatPrompt:
    """Encode the conversation, dropping the oldest turns until prompt + max_new_tokens fit the
    context; with nothing left to drop, shorten max_new_tokens; a prompt that alone fills the
    context is a ChatError."""
    context = context_length(model)
    history = [tuple(turn) for turn in history]
    for dropped in range(len(history) + 1):
        ids = encode_prompt(model, tokenizer, query, history[dropped:])
        if len(ids) + max_new_tokens <= context:
            break
    notes = []
    if dropped:
        notes.append(f"dropped the {dropped} oldest turn(s) of {len(history)} to fit the {context}-token context")
    if len(ids) >= context:
        raise ChatError(
            f"the prompt is {len(ids)} tokens, the model's context is {context}: nothing is left to drop; "
            "shorten the question (or /reset the conversation)"
        )
    if len(ids) + max_new_tokens > context:
        notes.append(f"max_new_tokens shortened from {max_new_tokens} to {context - len(ids)} "
                     f"(the prompt is {len(ids)} of {context} tokens)")
        max_new_tokens = context - len(ids)
    return ChatPrompt(ids, history[dropped:], dropped, max_new_tokens, "; ".join(notes) or None)


def _generation_kwargs(model, tokenizer, generation: dict) -> dict:
    kwargs = {**DEFAULT_GENERATION, **generation}
    if not kwargs["do_sample"]:
        for key in SAMPLING_ONLY:  # meaningless for greedy decoding; transformers warns about them
            kwargs.pop(key)
    kwargs["eos_token_id"] = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else kwargs["eos_token_id"][0]
    kwargs.setdefault("pad_token_id", pad)
    rows = model.config.vocab_size  # load paths size it from the checkpoint's embedding
    if rows > len(tokenizer):
        # Rows past the tokenizer (BlueLM pads 100002 tokens to 100008) cannot be decoded.
        kwargs.setdefault("suppress_tokens", list(range(len(tokenizer), rows)))
    return kwargs


# A compiled decode step is specialised to the static cache's length: sizing the cache in steps
# of this many positions recompiles only when a conversation outgrows one (attention reads every
# allocated position, so a cache of the whole context would slow short chats down).
FAST_CACHE_STEP = 1024


def _start(model, tokenizer, query, history, generation, on_notice, fast=False):
    kwargs = _generation_kwargs(model, tokenizer, generation)
    prompt = prepare_prompt(model, tokenizer, query, history or (), kwargs["max_new_tokens"])
    if prompt.notice:
        (on_notice or log.warning)(prompt.notice)
    kwargs["max_new_tokens"] = prompt.max_new_tokens
    if fast:
        need = len(prompt.input_ids) + prompt.max_new_tokens
        length = min(-(-need // FAST_CACHE_STEP) * FAST_CACHE_STEP, context_length(model))
        kwargs.update(fast_generate_config(model, compile=True, max_cache_len=length))
    device = model_device(model)
    input_ids = torch.tensor([prompt.input_ids], device=device)
    kwargs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return prompt, kwargs


def decode_reply(tokenizer, new_ids: Sequence[int], stop_ids: Sequence[int]) -> str:
    """Text of the generated ids up to (not including) the first stop token."""
    new_ids = list(new_ids)
    for i, token in enumerate(new_ids):
        if token in stop_ids:
            new_ids = new_ids[:i]
            break
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def chat(model, tokenizer, query: str, history: History | None = None, *,
         on_notice: Callable[[str], None] | None = None, threads: int | None = None, fast: bool = False,
         **generation) -> tuple[str, list[tuple[str, str]]]:
    """One turn: returns (reply, new_history). new_history is the history kept in the prompt plus
    this turn, so turns dropped for length stay dropped. `generation` overrides DEFAULT_GENERATION
    (any `model.generate` keyword); notices about trimming go to `on_notice` (default: log).
    threads: the CPU kernels' thread count (default torch's); fast: static cache + compiled step."""
    prompt, kwargs = _start(model, tokenizer, query, history, generation, on_notice, fast)
    with torch.inference_mode(), model_decode_threads(model, threads):
        out = model.generate(**kwargs)
    reply = decode_reply(tokenizer, out[0, len(prompt.input_ids):].tolist(), kwargs["eos_token_id"])
    return reply, prompt.history + [(query, reply)]


class _IdQueue(BaseStreamer):
    """Receives token ids from generate(); the first put() is the prompt itself."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def stream_chat(model, tokenizer, query: str, history: History | None = None, *,
                on_notice: Callable[[str], None] | None = None, threads: int | None = None, fast: bool = False,
                **generation) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Like chat(), but yields (reply_so_far, new_history) as tokens arrive; the last item equals
    chat()'s result (an empty reply is yielded too). Text is held back while it ends in an
    incomplete UTF-8 sequence (byte-fallback pieces), so each yielded reply extends the previous
    one; only the final item may differ if decoding a longer sequence rewrote earlier text."""
    prompt, kwargs = _start(model, tokenizer, query, history, generation, on_notice, fast)
    stop_ids = kwargs["eos_token_id"]
    ids_queue, cancel, failure = _IdQueue(), threading.Event(), []
    criteria = StoppingCriteriaList(list(kwargs.pop("stopping_criteria", None) or []) + [_Cancelled(cancel)])

    def run() -> None:
        try:
            with torch.inference_mode(), model_decode_threads(model, threads):
                model.generate(**kwargs, streamer=ids_queue, stopping_criteria=criteria)
        except BaseException as exc:  # re-raised in the consumer below
            failure.append(exc)
        finally:
            ids_queue.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    new_ids: list[int] = []
    shown, yielded = "", False
    try:
        while (chunk := ids_queue.queue.get()) is not None:
            new_ids += chunk
            text = decode_reply(tokenizer, new_ids, stop_ids)
            if text != shown and text.startswith(shown) and not text.endswith("\ufffd"):
                shown, yielded = text, True
                yield shown, prompt.history + [(query, shown)]
        worker.join()
        if failure:
            raise failure[0]
        reply = decode_reply(tokenizer, new_ids, stop_ids)
        if reply != shown or not yielded:
            yield reply, prompt.history + [(query, reply)]
    finally:
        cancel.set()  # the consumer stopped early (or failed): end generation too
        worker.join()


__all__ = ["ChatError", "ChatPrompt", "DEFAULT_GENERATION", "bluelm_prompt", "chat", "context_length",
           "decode_reply", "encode_prompt", "prepare_prompt", "stop_token_ids", "stream_chat"]
