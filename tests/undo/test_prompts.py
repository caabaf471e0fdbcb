"""Versioned prompt templates: rendering, and the template hash in the teacher cache key."""

from undo_jax.tasks import Record, get_task
from undo_jax.teachers import cache_key
from undo_jax.undo import prompts

RECORD = Record(id="x1", question="Ann has 3 {apples} and $5. How many?", answer="8",
                meta={"equation": "( 3.0 + 5.0 )", "type": "Addition"})


def test_rationale_prompt_holds_question_and_convention():
    task = get_task("svamp")
    req = prompts.rationale_request(task, RECORD, {"temperature": 0.0, "max_output_tokens": 64})
    text = req.messages[-1]["content"]
    assert RECORD.question in text  # braces and dollars survive (string.Template, substituted values)
    assert task.answer_convention in text
    assert req.cache_salt.startswith("rationale_v1@")
    assert req.context["record"] is RECORD and req.max_output_tokens == 64


def test_gaps_and_rewrite_prompts_carry_failures_gaps_and_previous():
    task = get_task("svamp")
    failure = {"question": "Q?", "answer": "4", "completion": "It is 5.", "prediction": "5",
               "teacher_rationale": "2 + 2 = 4."}
    gaps = prompts.gaps_request(task, [failure], [{"iteration": 1, "val_accuracy": 0.25, "train_examples": 9}], {})
    text = gaps.messages[-1]["content"]
    assert "2 + 2 = 4." in text and "It is 5." in text and "25.0%" in text
    rewrite = prompts.rewrite_request(task, RECORD, "3 + 5 = 8.", "- skips units", [failure], {})
    text = rewrite.messages[-1]["content"]
    assert "- skips units" in text and "3 + 5 = 8." in text and RECORD.question in text


def test_template_hash_is_part_of_the_cache_key(monkeypatch):
    task = get_task("svamp")
    req = prompts.rationale_request(task, RECORD, {})
    key = cache_key("openai", "m", req)
    text, _ = prompts.template("rationale")
    monkeypatch.setattr(prompts, "template", lambda name: (text, "rationale_v1@0000000000000000"))
    other = prompts.rationale_request(task, RECORD, {})
    assert other.messages == req.messages
    assert cache_key("openai", "m", other) != key
