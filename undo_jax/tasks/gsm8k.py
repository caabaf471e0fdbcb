"""GSM8K (Cobbe et al. 2021): train 7473, test 1319; fields question, answer ("... #### 72")."""

from __future__ import annotations

import re
from pathlib import Path

from undo_jax.tasks.base import Record, require_fields
from undo_jax.tasks.numeric import format_number, parse_number
from undo_jax.tasks.numeric_task import NumericTask
from undo_jax.tasks.sources import TaskDataError

_CALCULATOR = re.compile(r"<<[^<>]*>>")


class Gsm8kTask(NumericTask):
    name = "gsm8k"
    hf_dataset_id = "openai/gsm8k"
    hf_config = "main"
    default_source_hint = "gsm8k"
    breakdown_key = None

    def _make_record(self, row: dict, where: str, record_id: str = "") -> Record:
        require_fields(row, ("question", "answer"), where, self.name)
        solution = str(row["answer"])
        if "####" not in solution:
            raise TaskDataError(f"{where}: answer has no '#### <number>' final line")
        value = parse_number(solution.rsplit("####", 1)[1])
        if value is None:
            raise TaskDataError(f"{where}: no number after '####'")
        return Record(id=record_id, question=str(row["question"]).strip(), answer=format_number(value),
                      rationale=solution, meta={})

    def _pools(self, source, split: str) -> dict[str, list[Record]]:
        single_file = source is not None and Path(source).is_file()
        pools = {}
        for pool in ("train", "test"):
            if single_file and (pool == "test") != (split == "test"):
                continue
            rows = self._rows_for(source, (pool,), pool)
            # GSM8K rows carry no id: name them by split and row index ("train/0", "test/3"), stable across runs.
            pools[pool] = [self._make_record(row, where, f"{pool}/{i}") for i, (where, row) in enumerate(rows)]
        return pools

    def reference_rationale(self, record: Record) -> str | None:
        """The gold solution without calculator annotations, its '#### N' line replaced by 'The answer is N.'"""
        if record.rationale is None:
            return None
        return self.with_final_line(_CALCULATOR.sub("", record.rationale.rsplit("####", 1)[0]), record)
