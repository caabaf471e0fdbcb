"""report.md and accuracy.png of a run (and of a standard-distillation baseline beside it).

Everything comes from the run directory (metrics.jsonl, the DONE markers' wall times and teacher usage,
state.json), so a report can be rebuilt at any time: `python -m undo_jax.undo.report RUN [BASELINE]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from undo_jax.undo.rundir import RunDir, atomic_write_text, read_jsonl

STAGES = ("eval_train", "gaps", "data", "teacher_logits", "train", "eval_val", "eval_test")
OPTIONAL_STAGES = ("teacher_logits",)  # a column only in runs that have the stage (--distill=logits|on_policy)
LEDGER_FIELDS = ("calls", "cache_hits", "errors", "retries", "input_tokens", "output_tokens", "cost_usd")


def load_metrics(rd: RunDir) -> list[dict[str, Any]]:
    return read_jsonl(rd.metrics_path) if rd.metrics_path.is_file() else []


def stage_times(rd: RunDir) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for k in rd.iterations():
        for stage in STAGES:
            info = rd.marker_info(k, stage)
            if info is not None and "seconds" in info:
                out.setdefault(k, {})[stage] = float(info["seconds"])
    return out


def teacher_usage(rd: RunDir) -> dict[str, dict[str, dict[str, float]]]:
    """{stage label: {backend/model: ledger fields}} from the DONE markers (survives resumes)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k in rd.iterations():
        for stage in STAGES:
            if stage in OPTIONAL_STAGES:  # the logit teacher is a local model: no ledger (its marker names it)
                continue
            info = rd.marker_info(k, stage) or {}
            for name, entry in (info.get("teacher") or {}).items():
                out.setdefault(f"iter_{k}/{stage}", {})[name] = entry
    return out


def total_usage(usage: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for per_stage in usage.values():
        for name, entry in per_stage.items():
            t = totals.setdefault(name, dict.fromkeys(LEDGER_FIELDS, 0))
            for f in LEDGER_FIELDS:
                t[f] += entry.get(f, 0)
    return totals


def plot(path: Path, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Validation and test accuracy against cumulative epochs, one line style per run (Figures 2/3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"UNDO": "tab:red", "standard": "tab:blue"}
    for label, rows in runs.items():
        if not rows:
            continue
        xs = [r["epochs"] for r in rows]
        color = colors.get(label, None)
        ax.plot(xs, [100 * r["val_accuracy"] for r in rows], "o-", color=color, label=f"{label} validation")
        ax.plot(xs, [100 * r["test_accuracy"] for r in rows], "s--", color=color, label=f"{label} test")
    epochs = sorted({r["epochs"] for rows in runs.values() for r in rows})
    if epochs:
        ax.set_xticks(epochs)
    top = max([100 * r[k] for rows in runs.values() for r in rows for k in ("val_accuracy", "test_accuracy")] or [1])
    ax.set_ylim(0, min(100, max(5.0, top * 1.15)))
    ax.set_xlabel("training epochs (cumulative; 0 = base student)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def teacher_quality_lines(rd: RunDir) -> list[str]:
    """Per teacher stage: requests, final failures (with the questions lost), unusable answers (before/after the
    one retry), and a gap report used although weak (--allow_weak_gap_report)."""
    rows = []
    for k in rd.iterations():
        for stage in ("data", "gaps"):
            info = rd.marker_info(k, stage) or {}
            q = info.get("teacher_quality")
            if not q:
                continue
            lost = ", ".join(f"`{i}`" for i in info.get("failed_ids", [])) or ""
            weak = info.get("weak_gap_report") or ""
            rows.append(f"| {k} | {stage} | {q['requests']} | {q['failed']} | {q['unusable']} | "
                        f"{q['unusable_after_retry']} | {lost} {weak} |".replace("  |", " |"))
    if not rows:
        return []
    return ["", "## Teacher answers", "", "| iteration | stage | requests | failed | unusable | unusable after "
            "retry | failed questions / notes |", "|---:|---|---:|---:|---:|---:|---|", *rows]


def _distillation_line(flags: dict[str, Any]) -> str:
    distill = flags.get("distill", "rationales")
    if distill not in ("logits", "on_policy"):
        return "- distillation: rationales (SFT on the teacher's text)"
    on_policy = (f"; on-policy on {flags.get('on_policy_fraction')} of the steps (student samples at T "
                 f"{flags.get('on_policy_temperature')}, up to {flags.get('on_policy_max_new_tokens')} tokens)"
                 if distill == "on_policy" else "")
    return (f"- distillation: rationales + logits of `{flags.get('logit_teacher') or flags.get('teacher_model')}` "
            f"(top-{flags.get('kd_top_k')}, {flags.get('kd_divergence')}"
            f"{' beta ' + str(flags.get('kd_beta')) if flags.get('kd_divergence') == 'jsd' else ''}, "
            f"alpha {flags.get('kd_alpha')}, T {flags.get('kd_temperature')}{on_policy})")


def render(rd: RunDir, flags: dict[str, Any], metrics: list[dict[str, Any]], baseline: list[dict[str, Any]] | None,
           state: dict[str, Any], times: dict[int, dict[str, float]], usage: dict[str, dict[str, dict[str, float]]],
           baseline_name: str | None = None) -> str:
    mode = flags.get("mode", "undo")
    lines = [f"# {'UNDO' if mode == 'undo' else 'Standard distillation'} run: {rd.root.name}", ""]
    lines += [f"- task: `{flags.get('task')}` (data: `{flags.get('data_source') or 'hub'}`), student: "
              f"`{flags.get('student')}`, teacher: `{flags.get('teacher')}`"
              f"{' / ' + str(flags['teacher_model']) if flags.get('teacher_model') else ''}",
              f"- epochs: {flags.get('epochs_first')} first, {flags.get('epochs_later')} later; lr {flags.get('lr')}; "
              f"batch {flags.get('batch_size')}; accuracy = maj@{flags.get('maj_k', 1)}",
              _distillation_line(flags)]
    if state:
        lines.append(f"- stopped after iteration {state.get('iterations')}: {state.get('stop_reason')}")
        lines.append(f"- best iteration (validation): {state.get('best_iteration')} -> validation "
                     f"{_pct(state.get('best_val_accuracy'))}%, test {_pct(state.get('best_test_accuracy'))}%; "
                     f"exported to `final/`")
    lines += ["", "## Accuracy per iteration", ""]
    base_by_epoch = {r["epochs"]: r for r in (baseline or [])}
    header = "| iteration | epochs | train rationales | validation % | test % |"
    sep = "|---:|---:|---:|---:|---:|"
    if baseline is not None:
        header += f" {baseline_name or 'standard'} validation % | {baseline_name or 'standard'} test % |"
        sep += "---:|---:|"
    lines += [header, sep]
    if baseline and not any(m["iteration"] == 0 for m in metrics):
        # The base student is the same in both runs; a run started with --noeval_base shows the baseline's.
        metrics = [m for m in baseline if m["iteration"] == 0] + list(metrics)
    for m in metrics:
        label = "base" if m["iteration"] == 0 else str(m["iteration"])
        row = (f"| {label} | {m['epochs']} | {m.get('train_examples') or ''} | {_pct(m['val_accuracy'])} | "
               f"{_pct(m['test_accuracy'])} |")
        if baseline is not None:
            b = base_by_epoch.get(m["epochs"])
            row += f" {_pct(b['val_accuracy']) if b else ''} | {_pct(b['test_accuracy']) if b else ''} |"
        lines.append(row)
    lines += ["", "![accuracy](accuracy.png)", ""]
    columns = [s for s in STAGES if s not in OPTIONAL_STAGES or any(s in per for per in times.values())]
    lines += ["## Time per stage (seconds)", "", "| iteration | " + " | ".join(columns) + " | total |",
              "|---:|" + "---:|" * (len(columns) + 1)]
    for k, per in sorted(times.items()):
        lines.append(f"| {k} | " + " | ".join(f"{per[s]:.1f}" if s in per else "" for s in columns)
                     + f" | {sum(per.values()):.1f} |")
    lines += ["", "## Teacher cost ledger", ""]
    totals = total_usage(usage)
    if not totals:
        lines.append("No teacher calls were recorded.")
    else:
        lines += ["| backend/model | calls | cache hits | errors | retries | input tokens | output tokens | USD |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, t in sorted(totals.items()):
            lines.append(f"| {name} | {int(t['calls'])} | {int(t['cache_hits'])} | {int(t['errors'])} | "
                         f"{int(t['retries'])} | {int(t['input_tokens'])} | {int(t['output_tokens'])} | "
                         f"{t['cost_usd']:.4f} |")
        lines += ["", "Per stage: " + "; ".join(
            f"{stage}: " + ", ".join(f"{n} {int(e['calls'])} calls" for n, e in per.items())
            for stage, per in sorted(usage.items()))]
    lines += teacher_quality_lines(rd)
    gap_files = [k for k in rd.iterations() if (rd.iter_dir(k) / "gaps.md").is_file()]
    if gap_files:
        lines += ["", "## Gap reports", ""]
        lines += [f"- iteration {k}: [`iter_{k}/gaps.md`](iter_{k}/gaps.md)" for k in gap_files]
    return "\n".join(lines) + "\n"


def read_flags(rd: RunDir) -> dict[str, Any]:
    path = rd.root / "identity.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_report(rd: RunDir, cfg=None, *, baseline_dir: str | None = None) -> Path:
    """Write report.md and accuracy.png for `rd` (with the baseline run beside it, if any)."""
    flags = read_flags(rd)
    baseline_dir = baseline_dir or (cfg.output.baseline_run if cfg is not None else None)
    baseline = load_metrics(RunDir(baseline_dir)) if baseline_dir else None
    metrics = load_metrics(rd)
    state = json.loads(rd.state_path.read_text()) if rd.state_path.is_file() else {}
    mode = flags.get("mode", "undo")
    runs = {"UNDO" if mode == "undo" else "standard": metrics}
    if baseline is not None:
        runs["standard"] = baseline
    plot(rd.plot_path, runs)
    text = render(rd, flags, metrics, baseline, state, stage_times(rd), teacher_usage(rd),
                  baseline_name=Path(baseline_dir).name if baseline_dir else None)
    atomic_write_text(rd.report_path, text)
    return rd.report_path


USAGE = "usage: python -m undo_jax.undo.report RUN_DIR [BASELINE_RUN_DIR]"


def main(argv: list[str] | None = None) -> int:
    """Rewrite RUN_DIR's report.md and accuracy.png (with a --mode=standard run beside it); prints the path."""
    prog = "undo_jax.undo.report"
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "--helpfull", "-?") for a in args):
        print(f"{USAGE}\n\n{main.__doc__}")
        return 0
    options = [a for a in args if a.startswith("-")]
    problem = (f"{options[0]}: unknown option" if options else
               None if 1 <= len(args) <= 2 else f"expected 1 or 2 run directories, got {len(args)}")
    for path in args if problem is None else ():
        if not RunDir(path).metrics_path.is_file() and not (Path(path) / "iter_0").is_dir():
            problem = f"{path}: not a run directory with results (no metrics.jsonl)"
            break
    if problem:
        print(f"{prog}: error: {problem} ({USAGE})", file=sys.stderr)
        return 2
    print(write_report(RunDir(args[0]), baseline_dir=args[1] if len(args) > 1 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
