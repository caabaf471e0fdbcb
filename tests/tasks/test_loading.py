"""Loading: record counts, split sizes, deterministic disjoint carves, file formats, and bad input."""

import json
from collections import Counter

import pytest

from undo_jax.tasks import TASK_NAMES, Record, TaskDataError, get_task, subsample


def _raw(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def expected_sizes(shared_data, name: str) -> tuple[int, int, int]:
    """(train, validation, test) at val_size=200, from the raw files and each task's documented split rule."""
    if name == "svamp":  # no official split: a fixed 300 test, the rest is the pool
        n = len(_raw(shared_data / "svamp" / "svamp.jsonl"))
        return n - 300 - 200, 200, 300
    if name == "gsm8k":  # official train / test
        train, test = (len(_raw(shared_data / "gsm8k" / f"{s}.jsonl")) for s in ("train", "test"))
        return train - 200, 200, test
    if name == "math":  # official train / test; rows without an answer, and train rows repeating a test problem, drop
        test = [r for r in _raw(shared_data / "math" / "test.jsonl") if str(r["answer"]).strip()]
        test_problems = {r["problem"].strip() for r in test}
        train = [r for r in _raw(shared_data / "math" / "train.jsonl")
                 if str(r["answer"]).strip() and r["problem"].strip() not in test_problems]
        return len(train) - 200, 200, len(test)
    raise AssertionError(name)


def test_mmlu_pro_split_follows_its_rule(shared_data):
    """No train split upstream: per category, round(30%) of the question-text groups of the official test are held
    out; the rest plus the 70 official validation exemplars are the train pool."""
    raw_test = _raw(shared_data / "mmlu_pro" / "test.jsonl")
    raw_val = _raw(shared_data / "mmlu_pro" / "validation.jsonl")
    task, source = _source(shared_data, "mmlu_pro")
    train, val, test = (task.load(s, source) for s in ("train", "validation", "test"))
    assert len(val) == 200 and len(train) + len(val) + len(test) == len(raw_test) + len(raw_val)

    def groups_per_category(rows, text, category):
        first: dict[str, str] = {}
        for r in rows:
            first.setdefault(text(r).strip(), category(r))
        return Counter(first.values())

    upstream = groups_per_category(raw_test, lambda r: r["question"], lambda r: r["category"])
    held = groups_per_category(test, lambda r: r.question, lambda r: r.meta["category"])
    assert held == {c: round(0.3 * n) for c, n in upstream.items()}


def _source(shared_data, name):
    task = get_task(name)
    return task, shared_data / task.default_source_hint


@pytest.mark.parametrize("name", TASK_NAMES)
def test_split_sizes_and_disjointness(shared_data, name):
    task, source = _source(shared_data, name)
    train, val, test = (task.load(s, source) for s in ("train", "validation", "test"))
    if name != "mmlu_pro":  # its split rule is checked by test_mmlu_pro_split_follows_its_rule
        assert (len(train), len(val), len(test)) == expected_sizes(shared_data, name)
    ids = [{r.id for r in part} for part in (train, val, test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert not {r.question for r in train + val} & {r.question for r in test}
    assert all(isinstance(r, Record) and r.question and r.answer for r in train + val + test)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_validation_carve_is_deterministic_and_seeded(shared_data, name):
    task, source = _source(shared_data, name)
    first = [r.id for r in task.load("validation", source, val_size=50, seed=3)]
    again = [r.id for r in get_task(name).load("validation", source, val_size=50, seed=3)]
    other = [r.id for r in task.load("validation", source, val_size=50, seed=4)]
    assert first == again and first != other and len(first) == 50
    train = task.load("train", source, val_size=50, seed=3)
    assert len(train) == len(task.load("train", source)) + 150  # the pool is the same, the carve is smaller
    # The test split does not move with the run seed.
    assert [r.id for r in task.load("test", source)] == [r.id for r in get_task(name).load("test", source, seed=9)]


def test_svamp_700_300_and_meta(shared_data):
    task = get_task("svamp")
    source = shared_data / "svamp"
    assert len(task.load("train", source, val_size=0)) == 700
    test = task.load("test", source)
    assert len(test) == 300
    assert set(Counter(r.meta["type"] for r in test)) <= {
        "Subtraction", "Addition", "Common-Division", "Multiplication", "Common-Divison"}
    record = next(r for r in task.load("train", source, val_size=0) if r.id == "chal-1")
    assert record.question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
                               "How much do you have to pay to buy each pack?")
    assert record.answer == "51" and record.meta == {"equation": "( 76.0 - 25.0 )", "type": "Subtraction"}


def test_svamp_json_and_jsonl_agree(shared_data):
    jsonl = get_task("svamp").load("test", shared_data / "svamp" / "svamp.jsonl")
    array = get_task("svamp").load("test", shared_data / "svamp" / "SVAMP.json")
    assert jsonl == array


def test_svamp_presplit_folder_layout(shared_data, tmp_path):
    rows = [json.loads(line) for line in open(shared_data / "svamp" / "svamp.jsonl", encoding="utf-8")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:700]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[700:]))
    task = get_task("svamp")
    assert [r.id for r in task.load("test", tmp_path)] == [r["ID"] for r in rows[700:]]
    assert len(task.load("train", tmp_path, val_size=100)) == 600


def test_math_meta_and_math500(shared_data):
    task = get_task("math")
    test = task.load("test", shared_data / "math")
    assert Counter(r.meta["subject"] for r in test)["Algebra"] == 1187
    assert Counter(r.meta["level"] for r in test)[None] == 0
    train = task.load("train", shared_data / "math", val_size=0)
    # train/geometry/6032.json repeats test/precalculus/24307.json (up to a trailing newline): dropped from train.
    assert len(train) == 7497 and "train/geometry/6032.json" not in {r.id for r in train}
    assert sorted(r.id for r in train if r.meta["level"] is None) == [
        "train/geometry/377.json", "train/geometry/471.json"]
    math500 = get_task("math500").load("test", shared_data / "math")
    assert len(math500) == 500 and {r.id for r in math500} <= {r.id for r in test}
    assert {r.meta["level"] for r in math500} == {1, 2, 3, 4, 5}


def test_mmlu_pro_split(shared_data):
    task = get_task("mmlu_pro")
    source = shared_data / "mmlu_pro"
    pool = task.load("train", source, val_size=0)
    test = task.load("test", source)
    assert len(pool) + len(test) == 12032 + 70
    assert {str(i) for i in range(70)} <= {r.id for r in pool}
    by_category = Counter(r.meta["category"] for r in test)
    assert len(by_category) == 14
    official = Counter(json.loads(line)["category"] for line in open(source / "test.jsonl", encoding="utf-8"))
    for category, n in official.items():
        assert abs(by_category[category] / n - 0.3) < 0.03, category
    record = next(r for r in pool + test if r.id == "70")
    assert record.answer == "I" and len(record.meta["options"]) == 9 and record.meta["category"] == "business"
    assert all("N/A" not in r.meta["options"] for r in pool)
    assert all(o == o.strip() for r in test for o in r.meta["options"])


def test_mmlu_pro_parquet_equals_jsonl(shared_data):
    jsonl = get_task("mmlu_pro").load("test", shared_data / "mmlu_pro")
    parquet = get_task("mmlu_pro").load("test", shared_data / "mmlu_pro" / "hf_parquet")
    assert jsonl == parquet


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompt_and_final_answer_line_round_trip(shared_data, name):
    task, source = _source(shared_data, name)
    records = task.load("validation", source, val_size=20)
    assert task.answer_convention.startswith("End the solution with a final line")
    for record in records:
        messages = task.prompt_messages(record)
        assert [m["role"] for m in messages] == ["user"] and record.question in messages[0]["content"]
        line = task.final_answer_line(record.answer)
        assert task.is_correct(task.extract_answer("Some reasoning with 7 and (B).\n" + line), record)
    result = task.score([task.final_answer_line(r.answer) for r in records], records)
    assert result["accuracy"] == 1.0 and result["n"] == 20
    if task.breakdown_key is not None:
        assert sum(g["n"] for g in result["breakdown"].values()) == 20


def test_score_breakdown_counts():
    task = get_task("svamp")
    records = [Record(str(i), "q", str(i), meta={"type": "Addition" if i < 3 else "Subtraction"}) for i in range(5)]
    completions = ["The answer is 0.", "The answer is 9.", "The answer is 2.", "The answer is 3.", "none"]
    result = task.score(completions, records)
    assert result["correct"] == 3 and result["n"] == 5 and result["accuracy"] == pytest.approx(0.6)
    assert result["breakdown"] == {
        "Addition": {"accuracy": pytest.approx(2 / 3), "correct": 2, "n": 3},
        "Subtraction": {"accuracy": 0.5, "correct": 1, "n": 2},
    }
    with pytest.raises(ValueError, match="2 completions for 5 records"):
        task.score(completions[:2], records)


# ----- bad input ------------------------------------------------------------------------------------------------

def test_unknown_task_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'svmap'.*svamp, gsm8k, math, mmlu_pro"):
        get_task("svmap")
    with pytest.raises(ValueError, match="unknown split 'dev' for task gsm8k.*train, validation, test"):
        get_task("gsm8k").load("dev", tmp_path)
    with pytest.raises(ValueError, match="unknown MATH test set"):
        get_task("math", test_set="math5000")


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = {"question": "2+2?", "answer": "2+2=4\n#### 4"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + json.dumps({"question": "x"}) + "\n")
    with pytest.raises(TaskDataError, match=rf"{path}:3: missing field 'answer'"):
        get_task("gsm8k").load("train", path, val_size=0)


def test_missing_field_in_json_array_names_item(tmp_path):
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps([{"ID": "a", "Body": "b", "Question": "q", "Equation": "1", "Answer": 1}]))
    with pytest.raises(TaskDataError, match=rf"{path}: item 0: missing field 'Type'"):
        get_task("svamp").load("test", path)


def test_invalid_json_line_and_bad_values(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json}\n')
    with pytest.raises(TaskDataError, match=rf"{path}:2: invalid JSON"):
        get_task("gsm8k").load("test", path)
    path.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(TaskDataError, match=rf"{path}:1: answer has no '#### <number>'"):
        get_task("gsm8k").load("test", path)
    row = {"question_id": 1, "question": "q", "options": ["a", "b"], "answer": "E", "category": "law"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(TaskDataError, match=rf"{path}:1: answer 'E' is not one of the 2 option letters"):
        get_task("mmlu_pro").load("test", path)


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_task("math").load("test", tmp_path / "nowhere")
    with pytest.raises(TaskDataError, match=rf"{tmp_path}: no data file found"):
        get_task("math").load("test", tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TaskDataError, match="unsupported file type '.txt'"):
        get_task("gsm8k").load("test", tmp_path / "notes.txt")


def test_val_size_out_of_range(shared_data):
    with pytest.raises(ValueError, match="val_size=700 must be in"):
        get_task("svamp").load("validation", shared_data / "svamp", val_size=700)


def test_duplicate_ids_rejected(tmp_path):
    row = {"ID": "a", "Body": "b", "Question": "q", "Equation": "1", "Answer": 1, "Type": "Addition"}
    path = tmp_path / "svamp.jsonl"
    path.write_text((json.dumps(row) + "\n") * 400)
    with pytest.raises(TaskDataError, match="duplicate ids"):
        get_task("svamp").load("test", path)


def test_subsample_is_seeded_ordered_and_spread(shared_data):
    test = get_task("math").load("test", shared_data / "math")
    assert {r.meta["subject"] for r in test[:100]} == {"Algebra"}  # why a prefix is the wrong subset
    sample = subsample(test, 100, seed=1)
    assert [r.id for r in sample] == [r.id for r in subsample(test, 100, seed=1)]
    assert [r.id for r in sample] != [r.id for r in subsample(test, 100, seed=2)]
    positions = [test.index(r) for r in sample]
    assert positions == sorted(positions) and len({r.meta["subject"] for r in sample}) == 7
    assert subsample(test[:5], 10) == test[:5]
