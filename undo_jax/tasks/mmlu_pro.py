"""MMLU-Pro (Wang et al. 2024): test 12032, validation 70 (the official CoT exemplars), no train split.

UNDO needs a train split, so the official test set is divided once, by a fixed seed (not the run seed):
TEST_FRACTION of it, stratified by category, stays the held-out test; the rest plus the 70 official validation
exemplars form the train pool, from which `load` carves our validation split. Test questions whose text
repeats upstream (389 texts) are kept on one side together, so no question text is in both train and test.
Options padded with "N/A" (validation only) are dropped, as the official script does, and options are
stripped of the stray leading/trailing spaces some carry upstream.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from undo_jax.tasks.base import Record, Task, require_fields
from undo_jax.tasks.multiple_choice import LETTERS, extract_letter
from undo_jax.tasks.sources import TaskDataError

TEST_FRACTION = 0.3
TEST_SPLIT_SEED = 20240603  # fixed: the held-out test must not move with the run seed
FIELDS = ("question_id", "question", "options", "answer", "category")
MMLU_PRO_CONVENTION = (
    'End the solution with a final line of the form "The answer is (X)." where X is the letter of the correct option.'
)


def split_test_by_category(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(rest, held_out): per category, a seeded `fraction` of the question-text groups is held out; order kept.

    Records sharing a question text (upstream repeats, some across categories) always land on the same side.
    """
    by_text: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_text.setdefault(r.question, []).append(i)
    groups: dict[str, list[list[int]]] = defaultdict(list)  # category of a text's first record -> its groups
    for members in by_text.values():
        groups[records[members[0]].meta["category"]].append(members)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(records), dtype=bool)
    for category in sorted(groups):
        members = groups[category]
        n_held = int(round(fraction * len(members)))
        for g in rng.permutation(len(members))[:n_held]:
            held[members[g]] = True
    rest = [r for r, h in zip(records, held, strict=True) if not h]
    held_out = [r for r, h in zip(records, held, strict=True) if h]
    return rest, held_out


class MmluProTask(Task):
    name = "mmlu_pro"
    hf_dataset_id = "TIGER-Lab/MMLU-Pro"
    default_source_hint = "mmlu_pro"
    breakdown_key = "category"
    answer_convention = MMLU_PRO_CONVENTION

    def _make_record(self, row: dict, where: str) -> Record:
        require_fields(row, FIELDS, where, self.name)
        options = [str(o).strip() for o in row["options"] if str(o).strip() != "N/A"]
        answer = str(row["answer"]).strip()
        if answer not in LETTERS[: len(options)]:
            raise TaskDataError(f"{where}: answer {answer!r} is not one of the {len(options)} option letters")
        cot = str(row.get("cot_content") or "")
        return Record(
            id=str(row["question_id"]),
            question=str(row["question"]).strip(),
            answer=answer,
            rationale=cot or None,
            meta={"options": options, "category": str(row["category"]), "cot_content": cot,
                  "src": str(row.get("src", "")), "answer_index": row.get("answer_index")},
        )

    def _pools(self, source, split: str) -> dict[str, list[Record]]:
        path = Path(source) if source is not None else None
        official_test = self._records(self._rows_for(source, ("test",), "test"))
        exemplars = [] if path is not None and path.is_file() else self._records(
            self._rows_for(source, ("validation",), "validation"))
        rest, held_out = split_test_by_category(official_test, TEST_FRACTION, TEST_SPLIT_SEED)
        held_texts = {r.question for r in held_out}
        leaked = [r.id for r in exemplars if r.question in held_texts]
        if leaked:
            where = source or self.hf_dataset_id
            raise TaskDataError(f"{where}: validation question {leaked[0]} repeats a held-out test question")
        return {"train": exemplars + rest, "test": held_out}

    def prompt_messages(self, record: Record) -> list[dict[str, str]]:
        """Zero-shot form of the official CoT prompt (header, "Question:", "Options:", "Answer: Let's think ...")."""
        options = "".join(f"{LETTERS[i]}. {opt}\n" for i, opt in enumerate(record.meta["options"]))
        content = (
            f"The following is a multiple choice question about {record.meta['category']}. Think step by step and "
            'then finish your answer with "The answer is (X)" where X is the correct letter choice.\n\n'
            f"Question:\n{record.question}\nOptions:\n{options}Answer: Let's think step by step."
        )
        return [{"role": "user", "content": content}]

    def final_answer_line(self, answer: str) -> str:
        return f"The answer is ({answer})."

    def extract_answer(self, text: str) -> str | None:
        return extract_letter(text)

    def is_correct(self, prediction: str | None, record: Record) -> bool:
        return prediction is not None and prediction.strip().strip("()") == record.answer

    def reference_rationale(self, record: Record) -> str | None:
        """The official CoT without its "A: " prefix (it already ends with "The answer is (X).").

        Test records have no CoT: the statement of the correct option (no reasoning to imitate)."""
        text = (record.rationale or "").strip()
        if text:
            return self.with_final_line(text[3:] if text.startswith("A: ") else text, record)
        options = record.meta.get("options") or []
        idx = LETTERS.find(record.answer) if len(record.answer) == 1 else -1
        statement = f": {str(options[idx]).strip()}" if 0 <= idx < len(options) else ""
        return self.with_final_line(f"The correct option is ({record.answer}){statement}.", record)
