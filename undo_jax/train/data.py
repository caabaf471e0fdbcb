"""From (prompt, completion) examples to fixed-shape micro-batches (host side, numpy, deterministic).

A rendered example is its token ids plus the index where the completion starts; the loss covers the
completion tokens only. Each optimizer step takes a fixed group of examples from a seeded per-epoch
shuffle, so the step number alone says which examples a step sees (that is the data position a
checkpoint resumes from). Within a step, examples are packed into rows (first-fit decreasing;
segment ids keep attention inside an example) or padded, and the rows and lengths are rounded up to a
few bucket sizes so that the jitted step compiles for a handful of shapes only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from undo_jax.chat import as_messages, render_prompt, render_reply
from undo_jax.train.config import Example, TrainConfig


class OverlongPromptError(ValueError):
    """A prompt that leaves no room for a single completion token within max_length."""


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    ids: np.ndarray  # int32 [n], prompt then completion, already truncated to max_length
    completion_start: int  # ids[completion_start:] are completion tokens (the loss targets)

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    tokens: np.ndarray  # int32 [R, L]
    targets: np.ndarray  # int32 [R, L]: next token (0 where there is none)
    loss_mask: np.ndarray  # float32 [R, L]: 1 where targets[r, t] is a completion token
    segment_ids: np.ndarray  # int32 [R, L]: 1.. per example in the row, 0 = padding
    positions: np.ndarray  # int32 [R, L]: position inside the example

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- rendering
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as the chat template lays them out (`undo_jax.chat`).

    The prompt is rendered with the generation prompt (what the sampler feeds the model); the
    completion is the rest of the rendered conversation, so it ends with the template's end-of-turn
    token and the student learns to stop.
    """
    messages = as_messages(example.prompt)
    return (_encode(tokenizer, render_prompt(tokenizer, messages)),
            _encode(tokenizer, render_reply(tokenizer, messages, example.completion)))


def tokenize_examples(tokenizer, examples: Sequence[Example], config: TrainConfig
                      ) -> tuple[list[TokenizedExample], list[int]]:
    """Render and truncate every example; returns (kept, indices of skipped overlong examples)."""
    kept, skipped = [], []
    for i, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"train: examples[{i}] is a {type(example).__name__}, expected undo_jax.train.Example")
        prompt_ids, completion_ids = render_example(tokenizer, example)
        if not completion_ids:
            raise ValueError(f"train: examples[{i}] renders to an empty completion")
        # The first completion token is predicted from the last prompt token: both must fit.
        if len(prompt_ids) + 1 > config.max_length:
            if not config.skip_overlong:
                raise OverlongPromptError(
                    f"train: examples[{i}] prompt is {len(prompt_ids)} tokens, which leaves no completion token "
                    f"within max_length={config.max_length} (set skip_overlong=True to skip such examples)"
                )
            skipped.append(i)
            continue
        ids = np.asarray((prompt_ids + completion_ids)[: config.max_length], dtype=np.int32)
        kept.append(TokenizedExample(ids, len(prompt_ids)))
    return kept, skipped


def fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """Content hash of the tokenized dataset (a checkpoint only resumes on the same data)."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.int64(ex.completion_start).tobytes())
        h.update(np.int64(len(ex.ids)).tobytes())
        h.update(ex.ids.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- step schedule
def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def step_example_indices(num_examples: int, config: TrainConfig, step: int) -> np.ndarray:
    """Indices of the examples optimizer step `step` (0-based, global over epochs) trains on."""
    per_epoch = steps_per_epoch(num_examples, config.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(num_examples)
    return order[index * config.batch_size: (index + 1) * config.batch_size]


# ---------------------------------------------------------------- shapes
def length_bucket(n: int, max_length: int) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and their 1.5x) >= n, capped at max_length."""
    bucket = 16
    while bucket < n:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return min(bucket, max_length)


def row_bucket(rows: int, micro_batch: int, row_multiple: int) -> int:
    """Smallest of row_multiple * 2^k >= rows, capped at micro_batch."""
    bucket = row_multiple
    while bucket < rows:
        bucket *= 2
    return min(bucket, micro_batch)


def pack_rows(seqs: Sequence[TokenizedExample], capacity: int) -> list[list[TokenizedExample]]:
    """First-fit decreasing bin packing of whole examples into rows of `capacity` tokens."""
    rows: list[list[TokenizedExample]] = []
    free: list[int] = []
    for seq in sorted(seqs, key=len, reverse=True):  # stable: ties keep the step's order
        for r, room in enumerate(free):
            if len(seq) <= room:
                rows[r].append(seq)
                free[r] -= len(seq)
                break
        else:
            rows.append([seq])
            free.append(capacity - len(seq))
    return rows


def _fill(rows: Sequence[Sequence[TokenizedExample]], num_rows: int, length: int) -> MicroBatch:
    shape = (num_rows, length)
    tokens = np.zeros(shape, np.int32)
    targets = np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        start = 0
        for segment, seq in enumerate(row, start=1):
            n = len(seq)
            stop = start + n
            tokens[r, start:stop] = seq.ids
            targets[r, start:stop - 1] = seq.ids[1:]
            # Target ids[t+1] is a completion token iff t + 1 >= completion_start.
            first = max(seq.completion_start - 1, 0)
            loss_mask[r, start + first:stop - 1] = 1.0
            segment_ids[r, start:stop] = segment
            positions[r, start:stop] = np.arange(n)
            start = stop
    return MicroBatch(tokens, targets, loss_mask, segment_ids, positions)


def step_micro_batches(seqs: Sequence[TokenizedExample], config: TrainConfig, row_multiple: int = 1
                       ) -> list[MicroBatch]:
    """The micro-batches of one optimizer step (packed or padded per config)."""
    if config.micro_batch % row_multiple:
        raise ValueError(
            f"train: micro_batch={config.micro_batch} is not a multiple of the mesh's batch shards "
            f"(data x fsdp = {row_multiple})"
        )
    if config.packing:
        rows = pack_rows(seqs, config.max_length)
    else:
        rows = [[seq] for seq in sorted(seqs, key=len, reverse=True)]
    batches = []
    for first in range(0, len(rows), config.micro_batch):
        chunk = rows[first: first + config.micro_batch]
        longest = max(sum(len(s) for s in row) for row in chunk)
        batches.append(_fill(chunk, row_bucket(len(chunk), config.micro_batch, row_multiple),
                             length_bucket(longest, config.max_length)))
    return batches
