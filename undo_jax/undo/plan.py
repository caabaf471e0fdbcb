"""`main --dry_run`: what a run would do and what it may cost, from the checked config; nothing is written.

Teacher bounds, per iteration (n_train, n_val: the split sizes after --train_size/--val_size):
- iteration 1: one rationale request per training question (none with --teacher_data_from), plus one per
  validation question with --mode=undo (the gap analysis shows the teacher its own solutions);
- every later UNDO iteration: one gap-analysis request plus one rewrite per training question (at most that
  many with --regenerate=wrong); standard distillation asks nothing after iteration 1;
- calls <= 2 x requests: an answer found unusable is asked once more (failed HTTP attempts are not billed);
- output tokens <= calls x (--teacher_max_output_tokens + --teacher_thinking_budget);
- input tokens <= the UTF-8 bytes of each prompt (a token is at least one byte), with the parts the run
  writes later (earlier rationales, gap reports, student answers) at their token limits;
- cost <= (input x --teacher_price_input + output x --teacher_price_output) / 1e6.
Disk and memory are estimates from the student's parameter count (see `disk_estimate`, `train_memory_estimate`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from undo_jax.configtree import to_flag_lines
from undo_jax.undo import prompts
from undo_jax.undo.data_plan import stage_names

BYTES = {"float32": 4, "bfloat16": 2}
# Bytes a prediction line and the failure-example framing may add beyond the student's completion.
PREDICTION_BYTES = 64
# Bytes of one history line of the gap-analysis prompt (accuracy, examples, a 200-character gaps summary).
HISTORY_LINE_BYTES = 320


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _failure_bytes(record, *, with_teacher: bool) -> int:
    item = {"question": record.question, "answer": record.answer, "teacher_rationale": "", "completion": "",
            "prediction": ""}
    return _bytes(prompts.format_failure(99, item, with_teacher=with_teacher)) + PREDICTION_BYTES


def teacher_bounds(cfg, task, splits: dict[str, list]) -> dict[str, Any]:
    """Requests, calls, tokens and USD upper bounds per iteration and in total (the module docstring's rules)."""
    te, lp, ev = cfg.teacher, cfg.loop, cfg.eval
    settings = {"temperature": te.temperature, "max_output_tokens": te.max_output_tokens}
    out_per_call = te.max_output_tokens + (te.thinking_budget or 0)
    train, val = splits["train"], splits["validation"]
    rationale_bytes = [_bytes(prompts.rationale_request(task, r, settings).messages[0]["content"]) for r in train]
    val_bytes = [_bytes(prompts.rationale_request(task, r, settings).messages[0]["content"]) for r in val]
    worst_failure = max((_failure_bytes(r, with_teacher=True) for r in val), default=0)
    worst_example = max((_failure_bytes(r, with_teacher=False) for r in val), default=0)
    iterations = []
    for k in range(1, lp.max_iterations + 1):
        requests, input_bytes = 0, 0
        if k == 1:
            if not lp.teacher_data_from:
                requests, input_bytes = len(train), sum(rationale_bytes)
            if lp.mode == "undo":
                requests, input_bytes = requests + len(val), input_bytes + sum(val_bytes)
        elif lp.mode == "undo":
            shown = min(lp.diagnosis_examples, len(val))
            gaps = (_bytes(prompts.render("gaps", task_name=task.name, history="", n_failures=shown, failures=""))
                    + (k - 1) * HISTORY_LINE_BYTES + shown * (worst_failure + te.max_output_tokens + ev.max_new_tokens))
            examples = min(lp.rewrite_examples, len(val)) * (worst_example + ev.max_new_tokens)
            rewrite_fixed = examples + 2 * te.max_output_tokens  # the gap report and the earlier rationale
            rewrites = sum(_bytes(prompts.render("rewrite", gaps="", examples="", question=r.question, previous="",
                                                 answer_convention=task.answer_convention)) + rewrite_fixed
                           for r in train)
            requests, input_bytes = 1 + len(train), gaps + rewrites
        calls = 2 * requests
        iterations.append({"iteration": k, "requests": requests, "max_calls": calls,
                           "max_input_tokens": 2 * input_bytes, "max_output_tokens": calls * out_per_call})
    total = {f: sum(it[f] for it in iterations) for f in ("requests", "max_calls", "max_input_tokens",
                                                            "max_output_tokens")}
    total["max_cost_usd"] = (total["max_input_tokens"] * te.price_input
                             + total["max_output_tokens"] * te.price_output) / 1e6
    return {"per_iteration": iterations, **total, "price_input": te.price_input, "price_output": te.price_output}


def student_config(source: str):
    """The student's ModelConfig from its config.json or GGUF header (a hub id: its config.json only)."""
    from undo_jax.config import resolve_student
    from undo_jax.models import ModelConfig
    from undo_jax.preflight import run_iteration

    run = run_iteration(source)
    if run is not None:
        from undo_jax.undo.student import run_base_student

        source = run_base_student(run[0])
    path = resolve_student(source)
    if path.endswith(".gguf") and os.path.isfile(path):
        from undo_jax.models.gguf_io import _reader, gguf_config

        return gguf_config(_reader(path), path)
    if not os.path.isdir(path):
        from huggingface_hub import hf_hub_download

        return ModelConfig.from_json_file(hf_hub_download(path, "config.json"))
    return ModelConfig.from_json_file(os.path.join(path, "config.json"))


def disk_estimate(cfg, n_params: int) -> dict[str, int]:
    """Orbax bytes: a params-only snapshot per finished iteration, the full AdamW state (params + 2 moments) of
    the latest one(s) per --keep_train_state, up to --keep step checkpoints while an iteration trains, final/."""
    b = BYTES[cfg.student.param_dtype]
    params, state = n_params * b, 3 * n_params * b
    k = cfg.loop.max_iterations
    kept_states = {"all": k, "last": 1, "none": 0}[cfg.output.keep_train_state]
    return {"params_snapshot_bytes": params, "train_state_bytes": state,
            "while_training_bytes": cfg.train.keep * state,
            "run_total_bytes": k * params + kept_states * state + params}


def train_memory_estimate(cfg, model_config) -> dict[str, int]:
    """Device bytes of one training micro-step: params, gradients and AdamW moments (param dtype), activations
    kept for the backward pass (34 x hidden bytes per token and layer at 16 bit, Korthikanti et al. 2022, without
    the attention-score term as the attention never materializes S x S; with --remat the layer inputs only plus
    one layer), and the loss's logits chunk. An estimate: XLA's temporaries come on top."""
    c = model_config
    b = BYTES[cfg.student.param_dtype]
    compute = BYTES[cfg.train.compute_dtype]
    tokens = cfg.train.micro_batch * cfg.train.max_length
    per_layer = tokens * 34 * c.hidden_size * compute // 2
    if cfg.train.remat:
        activations = c.num_hidden_layers * tokens * c.hidden_size * compute + per_layer
    else:
        activations = c.num_hidden_layers * per_layer
    logits = min(tokens, cfg.train.loss_chunk) * c.vocab_size * 4 * 3  # logits, softmax and their gradient
    n = c.num_params()
    return {"params_bytes": n * b, "grads_bytes": n * b, "optimizer_bytes": 2 * n * b,
            "activations_bytes": activations, "logits_bytes": logits,
            "total_bytes": 4 * n * b + activations + logits}


def make_plan(run) -> dict[str, Any]:
    """The dry-run plan of a checked `UndoRun` (its data, tokenizer and mesh loaded)."""
    cfg = run.cfg
    sizes = {split: len(rows) for split, rows in run.splits.items()}
    stages = [f"{j}:{name}" for k in range(cfg.loop.max_iterations + 1) for j, name in stage_names(cfg.loop, k)]
    done = [s for s in stages if run.rd.is_done(int(s.split(":")[0]), s.split(":")[1])]
    plan: dict[str, Any] = {"run_dir": cfg.run_dir, "splits": sizes, "mesh": dict(run.mesh.shape),
                            "stages": stages, "already_done": done,
                            "teacher": {"backend": cfg.teacher.backend, "model": cfg.teacher.model,
                                        "batch_api": cfg.teacher.batch_api,
                                        **teacher_bounds(cfg, run.task, run.splits)}}
    try:
        model_config = student_config(str(cfg.student.source))
    except Exception as e:  # noqa: BLE001 - offline hub, unreadable header: the plan says so and goes on
        plan["student"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    else:
        n = model_config.num_params()
        plan["student"] = {"params": n, "disk": disk_estimate(cfg, n),
                           "train_step_memory": train_memory_estimate(cfg, model_config)}
    return plan


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_plan(run) -> dict[str, Any]:
    """Print the resolved config (as a flag file), the plan in words, and the plan as one JSON line."""
    plan = make_plan(run)
    t = plan["teacher"]
    lines = ["# resolved configuration", *to_flag_lines(run.cfg), "", "# plan (dry run: nothing was written)",
             f"splits: {plan['splits']['train']} train, {plan['splits']['validation']} validation, "
             f"{plan['splits']['test']} test; mesh {plan['mesh']}",
             f"stages ({len(plan['stages'])}, {len(plan['already_done'])} already done): " + " ".join(plan["stages"]),
             f"teacher {t['backend']}{'/' + t['model'] if t['model'] else ''}: {t['requests']} requests, at most "
             f"{t['max_calls']} calls, {t['max_input_tokens']} input + {t['max_output_tokens']} output tokens, "
             f"at most ${t['max_cost_usd']:.2f} (at ${t['price_input']}/${t['price_output']} per million tokens)"]
    lines += [f"  iteration {it['iteration']}: {it['requests']} requests, <= {it['max_calls']} calls"
              for it in t["per_iteration"]]
    s = plan["student"]
    if "error" in s:
        lines.append(f"student: size unknown ({s['error']})")
    else:
        d, m = s["disk"], s["train_step_memory"]
        lines += [f"student: {s['params'] / 1e6:.1f}M parameters",
                  f"disk: {_gb(d['params_snapshot_bytes'])} params per iteration, {_gb(d['train_state_bytes'])} per "
                  f"training state ({_gb(d['while_training_bytes'])} while training), about "
                  f"{_gb(d['run_total_bytes'])} for the run",
                  f"training step memory (estimate): {_gb(m['total_bytes'])} (params+grads+AdamW "
                  f"{_gb(m['params_bytes'] * 4)}, activations {_gb(m['activations_bytes'])}, logits "
                  f"{_gb(m['logits_bytes'])}), over the mesh's devices"]
    print("\n".join(lines))
    print(json.dumps({"dry_run": plan}))
    return plan
