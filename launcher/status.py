"""Each run's state from its files (no cluster needed): `grid status` from any shell, and
the progress lines `grid submit` prints while the grid runs."""

from __future__ import annotations

import threading

from sparsity_scaling.config import checkpoint_tokens
from sparsity_scaling.formatting import duration, short_count
from sparsity_scaling.rundir import RunDir

from .grid import Grid, RunSpec
from .workdir import Workdir


def run_state(run: RunDir, spec: RunSpec) -> dict:
    """State (pending, training, evaluating, done, failed), tokens of the budget, the latest
    rate, loss, gradient norm and activation ratio, loss spikes and skipped non-finite steps,
    how many checkpoints are measured (and how many could not be), the evaluation jobs
    running, and a failure's error and log."""
    checkpoints = run.checkpoints()
    final = checkpoint_tokens(spec.config)[-1]
    tokens = checkpoints[-1].tokens if checkpoints else 0
    train = [p for p in run.metric_points() if p["kind"] == "train"]
    loss = train[-1]["loss"] if train else None
    rate = train[-1].get("tokens_per_s") if train else None
    last = train[-1] if train else {}
    tokens = max(tokens, train[-1]["tokens"]) if train else tokens
    evaluations = run.evaluations()
    ratio = evaluations[-1]["activation_ratio"] if evaluations else None
    state = "pending"
    if checkpoints or tokens:
        state = "training"
    if checkpoints and checkpoints[-1].tokens == final:
        state = "evaluating"
    stabilised = run.sparsity_record()
    if stabilised is not None:
        state = "done"
        ratio = stabilised["checkpoints"][-1]["activation_ratio"]
    failure = run.failed()
    if failure is not None and state != "done":
        state = "failed"
    return {"run": spec.name, "state": state, "tokens": tokens, "of": final, "loss": loss,
            "activation_ratio": ratio, "tokens_per_s": rate, "checkpoints": len(checkpoints),
            "evaluated": len(evaluations), "jobs": run.running_jobs(), "failure": failure,
            "nodes": len(run.nodes()), "grad_norm": last.get("grad_norm"), "loss_spikes": last.get("loss_spikes", 0),
            "skipped_steps": last.get("skipped_steps", 0), "unmeasurable": len(run.evaluation_failures())}


def _job_text(job: dict) -> str:
    """`tokens_4096 (search step 3: CETT 0.2100, PPL ratio 1.0132; attempt 2)`."""
    name = "stabilising CETT" if job["job"] == "stabilised" else f"measuring {job['job']}"
    details = []
    if "search_step" in job:
        details.append(f"search step {job['search_step']}: CETT {job['cett']:.4f}, PPL ratio {job['ppl_ratio']:.4f}")
    if job.get("attempt", 1) > 1:
        details.append(f"attempt {job['attempt']}")
    return name + (f" ({'; '.join(details)})" if details else "")


def progress_line(s: dict) -> str:
    """One run in a line: state, tokens, rate and ETA while training, activation ratio, and
    the evaluation jobs done and pending."""
    if s["state"] == "failed":
        log = f" (log: {s['failure']['log']})" if s["failure"].get("log") else ""
        return f"{s['run']}: failed: {s['failure']['error']}{log}"
    parts = [f"{s['run']}: {s['state']}", f"{short_count(s['tokens'])}/{short_count(s['of'])} tokens"]
    if s["state"] == "training" and s["tokens_per_s"]:
        parts.append(f"{short_count(int(s['tokens_per_s']))} tokens/s, ETA "
                     f"{duration((s['of'] - s['tokens']) / s['tokens_per_s'])}")
    if s["loss_spikes"]:
        parts.append(f"{s['loss_spikes']} loss spikes")
    if s["skipped_steps"]:
        parts.append(f"{s['skipped_steps']} non-finite steps skipped")
    if s["unmeasurable"]:
        parts.append(f"{s['unmeasurable']} checkpoints not measurable (non-finite)")
    if s["nodes"] > 1:
        parts.append(f"trained on {s['nodes']} nodes (moved after losing one)")
    if s["activation_ratio"] is not None:
        parts.append(f"activation ratio {s['activation_ratio']:.4f}")
    if s["checkpoints"] and s["state"] != "done":
        pending = s["checkpoints"] - s["evaluated"]
        parts.append(f"checkpoints measured {s['evaluated']}/{s['checkpoints']}"
                     + (f", {pending} pending" if pending else "")
                     + (", stabilising CETT" if s["state"] == "evaluating" and not pending and not s["jobs"]
                        else ""))
    parts += [_job_text(job) for job in s["jobs"]]
    return ", ".join(parts)


def status_table(grid: Grid, workdir: Workdir) -> str:
    """`grid status`: a table of the runs, then the line of each run that is failed or has
    evaluation jobs running (what the job is doing, or the error and the log to read)."""
    lines = [f"{'run':<24}{'state':>11}{'tokens':>14}{'of':>12}{'loss':>9}{'grad norm':>11}{'spikes':>8}"
             f"{'act. ratio':>12}{'measured':>10}"]
    notes = []
    for spec in grid.runs:
        s = run_state(workdir.run(spec.name), spec)
        if s["state"] == "failed" or s["jobs"] or s["skipped_steps"] or s["unmeasurable"]:
            notes.append(progress_line(s))
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        norm = f"{s['grad_norm']:.3g}" if s["grad_norm"] is not None else "-"
        ratio = f"{s['activation_ratio']:.4f}" if s["activation_ratio"] is not None else "-"
        measured = f"{s['evaluated']}/{s['checkpoints']}"
        lines.append(f"{s['run']:<24}{s['state']:>11}{s['tokens']:>14,}{s['of']:>12,}{loss:>9}{norm:>11}"
                     f"{s['loss_spikes']:>8}{ratio:>12}{measured:>10}")
    return "\n".join(lines + notes)


class ProgressPrinter:
    """While a grid runs: every `every` seconds, the line of each run whose line changed."""

    def __init__(self, grid: Grid, workdir: Workdir, every: float = 30.0):
        self.grid, self.workdir, self.every = grid, workdir, every
        self.shown: dict[str, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.print_changes()

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            self.print_changes()

    def print_changes(self) -> None:
        for spec in self.grid.runs:
            try:
                line = progress_line(run_state(self.workdir.run(spec.name), spec))
            except (OSError, ValueError, KeyError):  # a file being replaced: next time
                continue
            if self.shown.get(spec.name) != line:
                self.shown[spec.name] = line
                print(f"[grid {self.grid.name}] {line}", flush=True)
