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
class SparseTargets:
    """A teacher's sparse next-token distribution for each completion token of one example (logit distillation:
    `undo_jax.train.distill_loss`): row j is the teacher at the position that predicts completion token j."""

    top_logp: np.ndarray  # float32 [m, k]: log-probs of the teacher's top-k tokens
    top_ids: np.ndarray  # int32 [m, k]
    log_tail: np.ndarray  # float32 [m]: log of the mass on every other token

    def __len__(self) -> int:
        return len(self.log_tail)


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    ids: np.ndarray  # int32 [n], prompt then completion, already truncated to max_length
    completion_start: int  # ids[completion_start:] are completion tokens (the loss targets)
    teacher: SparseTargets | None = None  # logit distillation only: n - completion_start rows
    # Weight of the CE on this example's completion (logit distillation only): 0 for the student's own samples
    # (on-policy distillation), whose tokens are no gold to imitate.
    ce_weight: float = 1.0

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    tokens: np.ndarray  # int32 [R, L]
    targets: np.ndarray  # int32 [R, L]: next token (0 where there is none)
    loss_mask: np.ndarray  # float32 [R, L]: 1 where targets[r, t] is a completion token
    segment_ids: np.ndarray  # int32 [R, L]: 1.. per example in the row, 0 = padding
    positions: np.ndarray  # int32 [R, L]: position inside the example
    # Logit distillation only, aligned with `targets` (zeros outside the loss mask): [R, L, k], [R, L, k], [R, L].
    top_logp: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    log_tail: np.ndarray | None = None
    ce_mask: np.ndarray | None = None  # float32 [R, L]: loss_mask times each example's ce_weight

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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
        if ex.teacher is not None:  # distilling from other teacher targets is other training data
            for a in (ex.teacher.top_logp, ex.teacher.top_ids, ex.teacher.log_tail):
                h.update(np.ascontiguousarray(a).tobytes())
        if ex.ce_weight != 1.0:
            h.update(np.float64(ex.ce_weight).tobytes())
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
    seqs = [seq for row in rows for seq in row]
    with_teacher = [seq.teacher is not None for seq in seqs]
    if any(with_teacher) and not all(with_teacher):
        raise ValueError("train: some examples carry teacher targets (logit distillation) and others do not")
    teacher = None
    if all(with_teacher) and seqs:
        k = seqs[0].teacher.top_ids.shape[1]
        teacher = (np.zeros((*shape, k), np.float32), np.zeros((*shape, k), np.int32), np.zeros(shape, np.float32),
                   np.zeros(shape, np.float32))
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
            if teacher is not None:
                span = slice(start + first, stop - 1)
                if len(seq.teacher) != span.stop - span.start:
                    raise ValueError(f"train: teacher targets for {len(seq.teacher)} completion tokens, but the "
                                     f"example has {span.stop - span.start}")
                teacher[0][r, span], teacher[1][r, span], teacher[2][r, span] = (
                    seq.teacher.top_logp, seq.teacher.top_ids, seq.teacher.log_tail)
                teacher[3][r, span] = seq.ce_weight
            start = stop
    if teacher is None:
        return MicroBatch(tokens, targets, loss_mask, segment_ids, positions)
    return MicroBatch(tokens, targets, loss_mask, segment_ids, positions, *teacher)


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
