"""`pipetransformer bench`: the paper's ablation side by side, over seeds, with the planner's
prediction of every epoch next to the measured one.

Every configuration is a real `pipetransformer train` run in its own process (torchrun for
more than one process), with the same data, seeds and processes; the bench reads back each
run folder's metrics.jsonl and summary.json. The helpers that turn runs into rows, tables
and speedups are pure and tested alone; `run_bench` starts the processes. No torch here.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from .config import ALL_STAGES, Config, apply_overrides
from .errors import ConfigError
from .planner import simulate
from .recorder import primary_metric, write_atomically
from .stopping import die_with_parent, end_children

__all__ = ["Variant", "VARIANTS", "Targets", "Preset", "PRESETS", "parse_row", "row_variant", "describe_row",
           "expand_rows", "row_configs", "pareto_frontier", "elapsed", "train_seconds",
           "mean_curve", "time_to_target", "summarize", "format_table", "markdown_table", "check_targets",
           "format_predictions", "plot_bench", "run_bench"]


@dataclass(frozen=True)
class Variant:
    description: str
    overrides: dict
    paper_start: bool = True  # one pipeline over all processes, where the paper's ablation starts
    plain: bool = False       # no freezing: a baseline that the method must beat


VARIANTS = {
    "p1": Variant("plain: one process using every core, no freezing (on a CPU the fastest plain layout)",
                  {"nproc": 1, "stages": 1, "freeze": "off", "cache": "off"}, paper_start=False, plain=True),
    "a1": Variant("fixed pipeline over all processes (GPipe), no freezing", {"freeze": "off", "elastic": False},
                  plain=True),
    "a2": Variant("data parallel, no freezing", {"freeze": "off", "stages": 1}, plain=True),
    "b": Variant("freeze only, fixed layout", {"elastic": False, "cache": "off"}),
    "c": Variant("freeze + AutoPipe + AutoDP", {"cache": "off"}),
    "d": Variant("freeze + AutoPipe + AutoDP + AutoCache", {}),
    "d-through-min": Variant("d with --freeze-rule through-min", {"freeze_rule": "through-min"}),
    "d-below-min": Variant("d with --freeze-rule below-min (the paper's argmin)", {"freeze_rule": "below-min"}),
    "d-auto": Variant("the default run: d starting from the layout --stages auto prices fastest", {},
                      paper_start=False),
    "d-auto-every8": Variant("d-auto deciding every 8 steps (--freeze-every 8: 3 decisions an epoch on the default "
                             "preset)", {"freeze_every": 8}, paper_start=False),
    "d-autofreeze": Variant("d-auto with --freeze-policy autofreeze (Liu et al. 2021)", {"freeze_policy": "autofreeze"},
                            paper_start=False),
    "d-update-ratio": Variant("d-auto with --freeze-policy update-ratio", {"freeze_policy": "update-ratio"},
                              paper_start=False),
}


@dataclass(frozen=True)
class Targets:
    """What the default freezing row must show (issues 10 and 17), passed to `check_targets`."""
    row: str = "d-auto"
    accuracy_gap: float = 0.003        # mean final accuracy at most this far under a2's (also the
    #                                    time-to-accuracy target: a2's mean final minus this)
    tta_speedup_over_a2: float = 1.5
    tta_speedup_over_a1: float = 2.5
    transition_share: float = 0.02     # of training time, the worst row


@dataclass(frozen=True)
class Preset:
    seeds: int
    config: dict
    rows: tuple[str, ...]
    train_less: str = ""  # this plain row also runs for 1..epochs-1 epochs, each with its own schedule


# Sized on this project's 2-core CPU machine (2 processes, one thread each; about 10 s of each
# run is starting processes and loading). small is a smoke test: the paper's ablation rows (12
# steps, so a larger learning rate to learn anything), and the alpha schedule so that every
# row's layout is known (c and d end on 1 stage x 2 replicas). The default preset asks the
# real question: each freeze policy from the default start against the fastest plain layout
# and against a2 trained for fewer epochs, over 3 seeds (768 sentences: about 15 minutes a
# seed). No checkpoints: nothing resumes a bench's run (an interrupted bench starts it over),
# and they would take 500 MB a run.
PRESETS = {
    "default": Preset(3, {"model": "minilm-l6", "data": "rotten-tomatoes", "train_samples": 768, "eval_samples": 0,
                          "max_length": 48, "epochs": 4, "batch_size": 32, "nproc": 2, "keep_checkpoints": 0},
                      ("p1", "a1", "a2", "d-auto", "d-autofreeze", "d-update-ratio"), train_less="a2"),
    "small": Preset(1, {"model": "minilm-l6", "data": "rotten-tomatoes", "train_samples": 128, "eval_samples": 128,
                        "max_length": 32, "epochs": 3, "batch_size": 32, "lr": 1e-3, "nproc": 2,
                        "freeze": "schedule", "alpha": 0.5, "keep_checkpoints": 0},
                    ("a1", "a2", "b", "c", "d")),
}


def parse_row(row: str) -> tuple[str, int | None]:
    """A row name: VARIANT[:SETTING=VALUE]...[@E], e.g. d-auto:alpha=0.2@3 (trained for E
    epochs, with its own full learning-rate schedule). Returns (the row without @E, E or None);
    raises ValueError for anything else."""
    name, at, epochs = row.partition("@")
    row_variant(name)
    if at and not (epochs.isdigit() and int(epochs) >= 1):
        raise ValueError(row)
    return name, int(epochs) if at else None


def row_variant(name: str) -> tuple[Variant, dict[str, str]]:
    """The variant of a row name without @E, and its SETTING=VALUE overrides (setting names as
    in a config file or the flags, values as text; `row_configs` checks them)."""
    variant, *settings = name.split(":")
    overrides = {}
    for setting in settings:
        key, eq, value = setting.partition("=")
        if variant not in VARIANTS or not (eq and key and value):
            raise ValueError(name)
        overrides[key.replace("-", "_")] = value
    if variant not in VARIANTS:
        raise ValueError(name)
    return VARIANTS[variant], overrides


def describe_row(row: str) -> str:
    name, epochs = parse_row(row)
    variant, overrides = row_variant(name)
    return (variant.description + "".join(f", {k}={v}" for k, v in overrides.items()) +
            ("" if epochs is None else f", trained for {epochs} epoch(s)"))


def expand_rows(rows: Sequence[str], train_less: str, epochs: int) -> list[str]:
    """`rows` with `train_less`@1..epochs-1 after `train_less` (when it is one of them)."""
    out = []
    for row in rows:
        out.append(row)
        if row == train_less:
            out += [f"{row}@{e}" for e in range(1, epochs) if f"{row}@{e}" not in rows]
    return out


# --- pure: runs -> rows ------------------------------------------------------------------

def elapsed(records: Sequence[dict]) -> list[float]:
    """Training time when each epoch's evaluation starts: the epochs so far and the
    transitions between them (evaluation itself is left out, as in epoch_seconds)."""
    out, total = [], 0.0
    for i, r in enumerate(records):
        total += r["epoch_seconds"] + (records[i - 1]["transition_seconds"] if i else 0.0)
        out.append(total)
    return out


def train_seconds(records: Sequence[dict]) -> float:
    """Epochs and every transition: the training time a configuration costs."""
    return sum(r["epoch_seconds"] + r["transition_seconds"] for r in records)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def score(rec: dict) -> float:
    """An epoch's validation score: accuracy, or F1 for question answering."""
    return rec[primary_metric(rec)]


def mean_curve(runs: Sequence[Sequence[dict]]) -> tuple[list[float], list[float]]:
    """(mean elapsed training time, mean validation accuracy) per epoch over seeds."""
    times = [elapsed(r) for r in runs]
    return ([statistics.fmean(t[e] for t in times) for e in range(len(times[0]))],
            [statistics.fmean(score(r[e]) for r in runs) for e in range(len(runs[0]))])


def time_to_target(runs: Sequence[Sequence[dict]], target: float) -> float | None:
    """Training time at the first epoch whose accuracy, averaged over seeds, reaches `target`;
    None if none does."""
    times, accuracy = mean_curve(runs)
    return next((t for t, a in zip(times, accuracy) if a >= target - 1e-12), None)


def _ratio(base: float | None, x: float | None) -> float | None:
    return base / x if base is not None and x else None


def _is_plain(row: str) -> bool:
    """A full-length baseline without freezing (a1, a2, p1; not a2@E)."""
    name, epochs = parse_row(row)
    return row_variant(name)[0].plain and epochs is None


def _family(rows: Iterable[str], family: str) -> list[str]:
    """`family` and its family@E rows, of `rows`."""
    return [n for n in rows if parse_row(n)[0] == family]


def _time_matched(rows: dict[str, dict], runs: dict[str, list[list[dict]]], name: str, family: str) -> dict | None:
    """`family` (a2 and its a2@E rows) against row `name` at equal training time: the family
    row whose training time is nearest, the per-seed final accuracy differences to it (name
    minus it, seeds paired), and the family's mean accuracy interpolated at name's time."""
    members = _family(rows, family)
    if not members:
        return None
    seconds = rows[name]["train_seconds"]
    nearest = min(members, key=lambda n: abs(rows[n]["train_seconds"] - seconds))
    diffs = [score(r[-1]) - score(b[-1]) for r, b in zip(runs[name], runs[nearest])]
    gap, spread = _mean_std(diffs)
    points = sorted((rows[n]["train_seconds"], rows[n]["final_accuracy"]) for n in members)
    interpolated = next((a0 + (a1 - a0) * (seconds - t0) / (t1 - t0) for (t0, a0), (t1, a1) in zip(points, points[1:])
                         if t0 <= seconds <= t1 and t1 > t0), None)
    return {"baseline": nearest, "baseline_seconds": rows[nearest]["train_seconds"], "gap": gap, "gap_std": spread,
            "seeds": len(diffs), "interpolated_accuracy": interpolated}


def pareto_frontier(rows: dict[str, dict]) -> list[str]:
    """The rows no other row beats in both training time and mean final accuracy, fastest first."""
    out: list[str] = []
    for name in sorted(rows, key=lambda n: (rows[n]["train_seconds"], -rows[n]["final_accuracy"])):
        if not out or rows[name]["final_accuracy"] > rows[out[-1]]["final_accuracy"]:
            out.append(name)
    return out


def summarize(runs: dict[str, list[list[dict]]], totals: dict[str, list[float]], margin: float = Targets.accuracy_gap,
              train_less: str = "a2") -> dict:
    """Rows (one per configuration, in the order given) from each run's metrics records and
    total seconds (summary.json); the accuracy target (a2's mean final accuracy minus
    `margin`; None without an a2 row); the fastest plain row; each freezing row against the
    `train_less` family at equal training time; and the Pareto frontier."""
    target = None
    if "a2" in runs:
        target = statistics.fmean(score(r[-1]) for r in runs["a2"]) - margin
    rows: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        final, best = _mean_std([score(r[-1]) for r in rs]), _mean_std([max(score(x) for x in r)
                                                                                for r in rs])
        train = _mean_std([train_seconds(r) for r in rs])
        transitions = statistics.fmean(sum(x["transition_seconds"] for x in r) for r in rs)
        rows[name] = {
            "seeds": len(rs), "final_accuracy": final[0], "final_accuracy_std": final[1],
            "best_accuracy": best[0], "best_accuracy_std": best[1],
            "total_seconds": statistics.fmean(totals[name]), "train_seconds": train[0], "train_seconds_std": train[1],
            "transition_seconds": transitions, "transition_share": transitions / train[0],
            "time_to_target": time_to_target(rs, target) if target is not None else None,
            "epoch_seconds": [statistics.fmean(r[e]["epoch_seconds"] for r in rs) for e in range(len(rs[0]))],
            "frozen_layers": [[x["frozen_layers"] for x in r] for r in rs],  # per seed: adaptive may differ
            "layouts": [[f"{x['stages']}x{x['replicas']}" for x in r] for r in rs],
        }
    plain = [n for n in rows if _is_plain(n)]
    fastest = min(plain, key=lambda n: rows[n]["train_seconds"]) if plain else None
    for name, row in rows.items():
        for base in ("a1", "a2", "fastest_plain"):
            ref = fastest if base == "fastest_plain" else base
            if ref in rows:
                row[f"speedup_over_{base}"] = _ratio(rows[ref]["train_seconds"], row["train_seconds"])
                row[f"tta_speedup_over_{base}"] = _ratio(rows[ref]["time_to_target"], row["time_to_target"])
        if not row_variant(parse_row(name)[0])[0].plain:
            row["time_matched"] = _time_matched(rows, runs, name, train_less)
    return {"target_accuracy": target, "margin": margin, "fastest_plain": fastest, "frontier": pareto_frontier(rows),
            "rows": rows}


def _fmt(x: float | None, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


_COLUMNS = ("config", "final acc %", "best acc %", "train s", "total s", "to target s", "transitions s (%)",
            "vs a1 time", "vs a1 to target", "vs a2 time", "vs a2 to target", "vs plain to target",
            "frozen per epoch", "layout per epoch")


def _cells(name: str, row: dict) -> list[str]:
    return [name, f"{100 * row['final_accuracy']:.2f} ± {100 * row['final_accuracy_std']:.2f}",
            f"{100 * row['best_accuracy']:.2f} ± {100 * row['best_accuracy_std']:.2f}",
            f"{row['train_seconds']:.1f}", f"{row['total_seconds']:.1f}", _fmt(row["time_to_target"], ".1f", "never"),
            f"{row['transition_seconds']:.1f} ({100 * row['transition_share']:.1f})",
            *(_fmt(row.get(key), ".2f") + ("x" if row.get(key) else "")
              for key in ("speedup_over_a1", "tta_speedup_over_a1", "speedup_over_a2", "tta_speedup_over_a2",
                          "tta_speedup_over_fastest_plain")),
            _distinct([",".join(map(str, t)) for t in row["frozen_layers"]]),
            _distinct([",".join(t) for t in row["layouts"]])]


def _distinct(per_seed: list[str]) -> str:
    return " / ".join(dict.fromkeys(per_seed))


def _notes(summary: dict) -> list[str]:
    """The lines under the table: target, fastest plain row, frontier, equal-time comparisons."""
    lines = []
    if summary["target_accuracy"] is not None:
        lines.append(f"target: {100 * summary['target_accuracy']:.2f} % (a2's mean final accuracy minus "
                     f"{100 * summary['margin']:.1f} points); times are training time (epochs + transitions)")
    if summary["fastest_plain"]:
        lines.append(f"fastest plain layout: {summary['fastest_plain']}")
    lines.append("Pareto frontier (training time against final accuracy): " + ", ".join(summary["frontier"]))
    for name, row in summary["rows"].items():
        m = row.get("time_matched")
        if m:
            lines.append(f"{name} against {m['baseline']} at about equal time ({row['train_seconds']:.1f} s against "
                         f"{m['baseline_seconds']:.1f} s): {100 * m['gap']:+.2f} ± {100 * m['gap_std']:.2f} points "
                         f"over {m['seeds']} paired seed(s)")
    return lines


def format_table(summary: dict) -> str:
    """The table `bench` prints, speedups in columns, and the notes under it."""
    table = [list(_COLUMNS)] + [_cells(n, r) for n, r in summary["rows"].items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    return "\n".join(lines + _notes(summary))


def _met(ok: bool, target: str, miss: str) -> str:
    return f" (target {target}: met)" if ok else f" (target {target}: missed by {miss})"


def check_targets(summary: dict, targets: Targets = Targets()) -> list[str]:
    """The targets for `targets.row`: time to accuracy over a1, a2 and the fastest plain
    layout, final accuracy against a2 and against a2 trained for about as long, and the
    transitions' share of training time; each line says met or by how much it is missed."""
    rows, name = summary["rows"], targets.row
    if name not in rows or "a2" not in rows:
        return [f"targets: need rows a2 and {name}"]
    r, lines = rows[name], []
    for base, want in (("a1", targets.tta_speedup_over_a1), ("a2", targets.tta_speedup_over_a2)):
        if base in rows:
            tta = r.get(f"tta_speedup_over_{base}")
            lines.append(f"{name} over {base} in time to accuracy: " + (
                "never reaches the target" if tta is None else
                f"{tta:.2f}x" + _met(tta >= want, f"{want:g}x", f"{want - tta:.2f}x")))
    plain = summary["fastest_plain"]
    tta = r.get("tta_speedup_over_fastest_plain")
    lines.append(f"{name} over the fastest plain layout ({plain}) in time to accuracy: " + (
        "never reaches the target" if tta is None else f"{tta:.2f}x" + _met(tta > 1, "above 1x", f"{1 - tta:.2f}x")))
    gap = rows["a2"]["final_accuracy"] - r["final_accuracy"]  # > 0: below a2
    lines.append(f"{name}'s mean final accuracy against a2's: {-100 * gap:+.2f} points" +
                 _met(gap <= targets.accuracy_gap + 1e-12, f"at most {100 * targets.accuracy_gap:g} below",
                      f"{100 * (gap - targets.accuracy_gap):.2f} points"))
    m = r.get("time_matched")
    if m:
        lines.append(f"{name}'s mean final accuracy against the time-matched {m['baseline']}'s: "
                     f"{100 * m['gap']:+.2f} ± {100 * m['gap_std']:.2f} points" +
                     _met(m["gap"] > 0, "higher", f"{-100 * m['gap']:.2f} points"))
    share = max(x["transition_share"] for x in rows.values())
    worst = max(rows, key=lambda n: rows[n]["transition_share"])
    lines.append(f"transitions: at most {100 * share:.1f} % of training time ({worst})" +
                 _met(share <= targets.transition_share, f"{100 * targets.transition_share:g} %",
                      f"{100 * (share - targets.transition_share):.1f} points"))
    return lines


def markdown_table(summary: dict) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(n, r)) + " |" for n, r in summary["rows"].items()]
    return "\n".join(lines)


def format_predictions(summary: dict, predicted: dict[str, list[float] | None]) -> str:
    """Measured against planned epoch times (rows of another process count than the profile's
    have no plan: None)."""
    lines = ["epoch seconds, measured (mean over seeds) / planned, and the plan's error:"]
    for name, row in summary["rows"].items():
        planned = predicted[name]
        if planned is None:
            lines.append(f"  {name:<14}not planned (the profile was measured for another process count)")
            continue
        pairs = zip(row["epoch_seconds"], planned)
        lines.append(f"  {name:<14}" + "  ".join(f"{m:6.1f}/{p:6.1f} ({100 * (p - m) / m:+4.0f}%)" for m, p in pairs))
    return "\n".join(lines)


def plot_bench(summary: dict, curves: dict[str, tuple[list[float], list[float]]],
               predicted: dict[str, list[float] | None], path: Path) -> None:
    """Accuracy against training time per epoch; final accuracy against training time with
    the Pareto frontier; frozen blocks with the layout; epoch time measured against planned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    curve_ax, pareto_ax, frozen_ax, time_ax = axes.flat
    colors: dict[str, str] = {}
    full = [n for n in rows if parse_row(n)[1] is None]
    for i, name in enumerate(full):
        row = rows[name]
        times, accuracy = curves[name]
        line, = curve_ax.plot(times, [100 * a for a in accuracy], "o-", label=name)
        colors[name] = line.get_color()
        epochs = range(1, len(row["epoch_seconds"]) + 1)
        shift = (i - (len(full) - 1) / 2) * 0.06
        frozen = row["frozen_layers"][0]  # the first seed's
        frozen_ax.plot([e + shift for e in epochs], frozen, "o-", color=colors[name], label=name)
        for e, k, layout in zip(epochs, frozen, row["layouts"][0]):
            frozen_ax.annotate(layout, (e + shift, k), textcoords="offset points", xytext=(0, 5 + 7 * (i % 2)),
                               ha="center", fontsize=7, color=colors[name])
        time_ax.plot(epochs, row["epoch_seconds"], "o-", color=colors[name], label=f"{name} measured")
        if predicted[name] is not None:
            time_ax.plot(epochs, predicted[name], "x--", color=colors[name], label=f"{name} planned")
    for family in dict.fromkeys(parse_row(n)[0] for n in rows if parse_row(n)[1] is not None):
        members = sorted(_family(rows, family), key=lambda n: rows[n]["train_seconds"])
        pareto_ax.plot([rows[n]["train_seconds"] for n in members],
                       [100 * rows[n]["final_accuracy"] for n in members], "-", color=colors.get(family, "gray"),
                       alpha=0.6, label=f"{family} trained for 1..E epochs")
    for name, row in rows.items():
        pareto_ax.errorbar(row["train_seconds"], 100 * row["final_accuracy"], yerr=100 * row["final_accuracy_std"],
                           fmt="o", capsize=3, color=colors.get(name, colors.get(parse_row(name)[0], "gray")))
        pareto_ax.annotate(name, (row["train_seconds"], 100 * row["final_accuracy"]), textcoords="offset points",
                           xytext=(4, 4), fontsize=7)
    frontier = summary["frontier"]
    pareto_ax.step([rows[n]["train_seconds"] for n in frontier], [100 * rows[n]["final_accuracy"] for n in frontier],
                   "k--", where="post", lw=1, label="Pareto frontier")
    if summary["target_accuracy"] is not None:
        for ax in (curve_ax, pareto_ax):
            ax.axhline(100 * summary["target_accuracy"], ls=":", color="gray", label="target")
    seeds = max(r["seeds"] for r in rows.values())
    curve_ax.set(title=f"validation accuracy per epoch (mean over {seeds} seed(s))", xlabel="training time (s)",
                 ylabel="%")
    pareto_ax.set(title="final accuracy (mean ± std) against training time", xlabel="training time (s)", ylabel="%")
    frozen_ax.set(title="frozen blocks per epoch, first seed (labels: stages x replicas)", xlabel="epoch",
                  ylabel="blocks")
    time_ax.set(title="epoch time: measured (o) and planned (x)", xlabel="epoch", ylabel="s")
    ticks = range(1, len(rows[full[0]]["epoch_seconds"]) + 1 if full else 2)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (frozen_ax, time_ax):
        ax.set_xticks(ticks)
    for ax in (curve_ax, pareto_ax, frozen_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the processes -----------------------------------------------------------------------

def _machine() -> dict:
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "?"
    return {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch_version}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipetransformer", *args]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        # a session of its own: a signal to the terminal's group reaches the run once, from here
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = child.wait()
        finally:  # stopped by a signal: the run stops its workers and removes its files
            end_children([child])
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {rc}); its output, {log}, ends:\n{tail}")


def _train(cfg: Config, run_dir: Path, logs: Path, say: Callable[[str], None]) -> tuple[list[dict], float, list]:
    """One configuration and seed: a `pipetransformer train` process, or the finished run
    folder of an interrupted bench (only if it ran this very configuration). Returns its
    records, total seconds and the machine's load average before and after (other programs
    on the machine slow a run down: the load says when)."""
    wanted = {**cfg.to_dict(), "run_dir": str(run_dir)}
    done = run_dir / "summary.json"
    load = []
    if done.exists():
        if yaml.safe_load((run_dir / "config.yaml").read_text()) != wanted:
            raise ConfigError(f"--out: {run_dir} holds a run of other settings; pass a new --out")
        say(f"{run_dir.name}: finished earlier, read back")
    else:
        if run_dir.exists():  # interrupted: this bench's own folder, started again
            import shutil
            shutil.rmtree(run_dir)
        config_file = logs / f"{run_dir.name}.yaml"
        config_file.write_text(yaml.safe_dump(wanted, sort_keys=False))
        began, load = time.perf_counter(), [os.getloadavg()[0]]
        _run(_cli("train", "--config", str(config_file)), logs / f"{run_dir.name}.log")
        load.append(os.getloadavg()[0])
        say(f"{run_dir.name}: {time.perf_counter() - began:.0f} s (load average {load[0]:.1f} -> {load[1]:.1f})")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads(done.read_text())["total_seconds"], load


def row_configs(base: Config, rows: Sequence[str]) -> dict[str, Config]:
    """Each row's settings: the base, the paper's start where the variant keeps it (one
    pipeline over all processes unless --stages fixes one), its overrides and epochs; each
    checked as `train` would check it."""
    paper_start = {"stages": base.parallel.stages or ALL_STAGES}
    configs = {}
    for row in rows:
        name, epochs = parse_row(row)
        variant, settings = row_variant(name)
        try:
            cfg = apply_overrides(base, {**(paper_start if variant.paper_start else {}), **variant.overrides,
                                         **settings, "epochs": epochs})
            cfg.validate(cfg.parallel.nproc)
        except ConfigError as e:
            raise ConfigError(f"bench row {row}: {e}") from None
        configs[row] = cfg
    return configs


def run_bench(base: Config, rows: Sequence[str], seeds: int, out: Path, profile_file: str | None,
              command: str, say: Callable[[str], None] = print, targets: Targets = Targets(),
              train_less: str = "a2") -> dict:
    """Profile once, run every configuration for every seed (seeds outermost, so a slow
    spell of the machine touches every configuration alike), then summarize, predict, write
    bench.json, bench.md and bench.png into `out`. Returns the summary."""
    from .costs import local_hardware, read_profile

    if (out / "bench.json").exists():
        raise ConfigError(f"--out={str(out)!r} already holds a finished bench; pass a new --out")
    nproc = base.parallel.nproc
    configs = row_configs(base, rows)
    profile_path = Path(profile_file) if profile_file else out / "profile.json"
    given = read_profile(profile_path) if profile_file else None
    if given and given.device == "cpu" and given.cores and given.processes != nproc:
        raise ConfigError(f"--profile={profile_file!r} was measured as one of {given.processes} process(es) "
                          f"and this bench runs {nproc}: its times would not be theirs; profile with "
                          f"`pipetransformer profile --processes {nproc}` or drop --profile")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if not profile_path.exists():
        say(f"profiling {base.model.model} (batch {base.train.batch_size}, as {nproc} process(es) run it; load "
            f"average {os.getloadavg()[0]:.1f})")
        _run(_cli("profile", "--model", base.model.model, "--data", base.data.data, "--max-length",
                  str(base.model.max_length), "--image-size", str(base.data.image_size), "--batch-size",
                  str(base.train.batch_size), "--processes", str(nproc), "--out", str(profile_path)),
             logs / "profile.log")
    profile = read_profile(profile_path)
    runs: dict[str, list[list[dict]]] = {name: [] for name in rows}
    totals: dict[str, list[float]] = {name: [] for name in rows}
    loads: dict[str, list[list]] = {name: [] for name in rows}
    for i in range(seeds):
        seed = base.train.seed + i
        for name in rows:
            cfg = apply_overrides(configs[name], {"seed": seed})
            records, total, load = _train(cfg, out / "runs" / f"{name}-seed{seed}", logs, say)
            runs[name].append(records)
            totals[name].append(total)
            loads[name].append(load)
    summary = summarize(runs, totals, targets.accuracy_gap, train_less)
    hardware = local_hardware(profile, nproc)

    def planned(cfg: Config, traces: list[list[int]]) -> list[float] | None:
        """Mean over seeds of the plan given the frozen blocks each run measured, so plan
        and run differ by timing alone; None for a run of another process count than the
        profile's (its processes' threads are not the profile's)."""
        if cfg.parallel.nproc != nproc:
            return None
        samples = runs[next(iter(runs))][0][0]["steps"] * cfg.train.batch_size
        plans = [simulate(profile, hardware, cfg, samples, t, choose_micro_batches=False) for t in traces]
        return [statistics.fmean(p[e].seconds for p in plans) for e in range(len(plans[0]))]
    predicted = {name: planned(configs[name], row["frozen_layers"]) for name, row in summary["rows"].items()}
    for name, row in summary["rows"].items():
        row["planned_epoch_seconds"] = predicted[name]
    curves = {name: mean_curve(rs) for name, rs in runs.items()}
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
              "profile": str(profile_path), "config": base.to_dict(), "seeds": seeds,
              "variants": {n: describe_row(n) for n in rows},
              **summary, "targets": check_targets(summary, targets),
              "runs": {n: [{"records": r, "total_seconds": t, "load_average": a}
                           for r, t, a in zip(runs[n], totals[n], loads[n])] for n in rows}}
    notes = "".join(f"- {line}\n" for line in _notes(summary) + result["targets"])
    (out / "bench.md").write_text(f"`{command}` ({result['date']}, {result['machine']['processor']}, "
                                  f"{result['machine']['cpus']} CPUs)\n\n{markdown_table(summary)}\n\n{notes}")
    plot_bench(summary, curves, predicted, out / "bench.png")
    write_atomically(out / "bench.json", json.dumps(result, indent=1) + "\n")  # its presence: a finished bench
    say(format_table(summary))
    say("\n".join(result["targets"]))
    say(format_predictions(summary, predicted))
    say(f"wrote {out}/bench.json, bench.md and bench.png")
    return summary
