"""Everything a run writes: the run folder, metrics.jsonl, log lines, progress bars, the
plot, summary.json and final/ (a Hugging Face folder). Only rank 0 writes or prints."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import Config
from .errors import ConfigError

__all__ = ["Recorder", "plot_metrics", "primary_metric", "refuse_used_run_dir", "save_final", "write_atomically"]

SCORES = ("val_accuracy", "val_exact_match", "val_f1")  # whichever a task reports, as fractions


def primary_metric(rec: dict) -> str:
    """The validation score a run is judged by: F1 for question answering, else accuracy."""
    return "val_f1" if "val_f1" in rec else "val_accuracy"


class Recorder:
    def __init__(self, cfg: Config, rank: int, progress: bool = True):
        self.cfg, self.rank = cfg, rank
        self.run_dir = Path(cfg.run_dir)
        self.progress = progress and rank == 0

    def log(self, *msg) -> None:
        if self.rank == 0:
            print(*msg, flush=True)

    def start(self, resumed: bool, records: list[dict], header: list[str | None]) -> None:
        """Claim the run folder: a new run takes an empty or absent one and writes the resolved
        config; a resumed run rewrites metrics.jsonl to the epochs its checkpoint holds. Then
        the header lines (None: nothing to say)."""
        if self.rank != 0:
            return
        if not resumed:
            refuse_used_run_dir(self.run_dir)
        if not resumed or not (self.run_dir / "config.yaml").exists():  # a restart before any epoch
            self.run_dir.mkdir(parents=True, exist_ok=True)
            import yaml
            write_atomically(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        write_atomically(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        for line in header:
            if line:
                self.log(line)

    def transition(self, where: str, old, new, blocks: int, seconds: float) -> None:
        """The log line of a transition from plan `old` to plan `new` (layouts.TransitionPlan)."""
        self.log(f"transition {where}: frozen {old.frozen} -> {new.frozen} of {blocks} blocks, "
                 f"layout {old.layout} -> {new.layout}, {new.units_per_stage()} active units per stage "
                 f"({seconds:.2f} s)")

    def bar(self, total: int, desc: str, initial: int = 0):
        if not self.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)

    def epoch(self, rec: dict) -> None:
        """One epoch's record: a log line, and a line of metrics.jsonl."""
        rec["open_fds"] = _open_fds()  # rank 0's; flat across transitions = no leaked groups
        scores = " ".join(f"{k} {rec[k]:.4f}" for k in SCORES if k in rec)
        self.log(f"epoch {rec['epoch']}: {scores} val_loss "
                 f"{rec['val_loss']:.4f} train_loss {rec['train_loss']:.4f} | frozen "
                 f"{rec['frozen_layers']}/{rec['total_layers']} | {rec['stages']} stage(s) x "
                 f"{rec['replicas']} replica(s), M={rec['micro_batches']} | "
                 f"{rec['samples_per_second']:.1f} samples/s, {rec['epoch_seconds']:.1f} s")
        if self.rank == 0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def finish(self, model, records: list[dict], seconds: float, layout) -> None:
        """final/ (Hugging Face format, written under a temporary name and renamed), metrics.png
        and summary.json."""
        if self.rank != 0:
            return
        try:
            save_final(model, self.run_dir)
        except OSError as e:
            from .checkpoint import latest
            if latest(self.run_dir) is None:
                raise RuntimeError(f"saving {self.run_dir / 'final'} failed ({e.strerror or e}); there is no "
                                   f"checkpoint to write it from (--keep-checkpoints 0): free space or fix "
                                   f"permissions and run again") from e
            raise RuntimeError(f"saving {self.run_dir / 'final'} failed ({e.strerror or e}); the last good "
                               f"checkpoint is {latest(self.run_dir)}; once the cause is fixed, write "
                               f"final/ from it with: pipetransformer export {self.run_dir}") from e
        plot_metrics(records, self.run_dir / "metrics.png")
        timeline = plot_freeze_timeline(records, self.run_dir / "freeze-timeline.png")
        metric = primary_metric(records[-1])
        summary = {**{k: records[-1][k] for k in SCORES if k in records[-1]}, "total_seconds": seconds,
                   "epochs": len(records), "final_frozen_layers": records[-1]["frozen_after"],
                   "final_layout": f"{layout}"}
        write_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.log(f"done in {seconds:.1f} s: {metric} {summary[metric]:.4f}; wrote "
                 f"{self.run_dir}/metrics.jsonl, metrics.png{', freeze-timeline.png' if timeline else ''} "
                 f"and final/ (Hugging Face format)")


def refuse_used_run_dir(run_dir: Path) -> None:
    """A new run never writes into a folder that holds another run, finished or stopped."""
    if (run_dir / "final").exists():
        raise ConfigError(f"--run-dir={str(run_dir)!r} already holds a finished run; nothing was "
                          f"overwritten. Pass a new --run-dir or move that folder away")
    if any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise ConfigError(f"--run-dir={str(run_dir)!r} already holds a stopped run; nothing was "
                          f"overwritten. Continue it with: pipetransformer train --resume {run_dir} "
                          f"(or pass a new --run-dir)")


def save_final(model, run_dir: Path) -> None:
    """Write final/ atomically: a folder that exists is complete."""
    from transformers import logging as hf_logging
    hf_logging.disable_progress_bar()  # one shard: a bar would only clutter the log
    tmp, final = run_dir / ".final-tmp", run_dir / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.hf_model.to("cpu").save_pretrained(tmp)
    if model.processor is not None:
        model.processor.save_pretrained(tmp)
    if not (tmp / "config.json").is_file():  # save_pretrained logs some failures without raising
        raise OSError(f"{tmp} could not be written")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = {"val_accuracy": "accuracy", "val_exact_match": "exact match", "val_f1": "F1"}
    shown = [k for k in SCORES if k in records[0]]
    for key in shown:
        axes[0].plot(epochs, [100 * r[key] for r in records], "o-", label=names[key])
    if len(shown) > 1:
        axes[0].legend(fontsize=8)
    axes[0].set(title="validation " + " and ".join(names[k] for k in shown), xlabel="epoch", ylabel="%")
    axes[1].step(epochs, [r["frozen_layers"] for r in records], "o-", where="mid")
    axes[1].set(title="frozen blocks during epoch", xlabel="epoch",
                ylim=(-0.3, records[0]["total_layers"] + 0.3))
    for r in records:
        axes[1].annotate(f"{r['stages']}x{r['replicas']}", (r["epoch"], r["frozen_layers"]),
                         textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axes[2].bar(epochs, [r["samples_per_second"] for r in records])
    axes[2].set(title="training throughput", xlabel="epoch", ylabel="samples / s")
    for ax in axes:
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    fig.suptitle("pipetransformer run (labels: stages x replicas)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decision_points(records: list[dict]) -> list[tuple[str, dict, int, str]]:
    """(label, decision, blocks frozen before it, layout after it) of each decision in order:
    those --freeze-every made inside an epoch, then the one at its end."""
    points, by_epoch = [], {r["epoch"]: r for r in records}
    for r in records:
        frozen = r["frozen_layers"]
        for d in r.get("decisions_within", []):
            points.append((f"{r['epoch']}:{d['step']}", d["decision"], frozen, f"{d['stages']}x{d['replicas']}"))
            frozen = d["decision"]["frozen"]
        if "decision" in r:
            n = by_epoch.get(r["epoch"] + 1)
            points.append((f"after {r['epoch']}", r["decision"], frozen, f"{n['stages']}x{n['replicas']}" if n else ""))
    return points


def plot_freeze_timeline(records: list[dict], path: Path) -> bool:
    """Blocks x decisions: each cell coloured by the decision's per-block statistic (scaled to
    the largest active block's; grey: frozen before it), the frozen boundary after each
    decision, the alpha cap, and the layout after it. False (nothing drawn) for a run
    without decisions, or whose decisions never could freeze (--freeze off: no cap)."""
    decisions = _decision_points(records)
    if not any("cap" in d for _, d, _, _ in decisions):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = records[0]["total_layers"]
    grid = np.full((blocks, len(decisions)), np.nan)
    for j, (_, d, before, _) in enumerate(decisions):
        values = d.get("values")
        if values:
            active = np.asarray(values[before:], dtype=float)
            top = float(np.nanmax(np.abs(active))) if active.size else 0.0
            grid[before:, j] = np.abs(active) / top if top > 0 else 0.0
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(decisions)), 1.2 + 0.45 * blocks))
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=0, vmax=1,
                      extent=(-0.5, len(decisions) - 0.5, -0.5, blocks - 0.5))
    x = np.arange(len(decisions))
    ax.step(x, [d["frozen"] - 0.5 for _, d, _, _ in decisions], "r-", where="mid", lw=2,
            label="frozen boundary after the decision")
    if any("cap" in d for _, d, _, _ in decisions):
        ax.step(x, [d.get("cap", d["frozen"]) - 0.5 for _, d, _, _ in decisions], color="orange", ls="--",
                where="mid", lw=1.5, label="alpha cap")
    ax.set_xticks(x, [f"{label}\n{layout}" for label, _, _, layout in decisions])
    ax.set(xlabel="decision (after epoch E, or at epoch:step; then the layout, stages x replicas)",
           ylabel="block", yticks=range(blocks))
    stat = next((d["statistic"] for _, d, _, _ in decisions if "statistic" in d), None)
    policy = next((d["policy"] for _, d, _, _ in decisions if "policy" in d), None)
    label = f"{stat} / largest active (policy {policy})" if stat else "no statistic (freeze by schedule)"
    fig.colorbar(image, ax=ax, label=label)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
    ax.set_title("freeze timeline (grey: frozen before the decision)", fontsize=9, pad=18)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
