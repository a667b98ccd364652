"""Epoch time with and without AutoCache at each frozen count, side by side in one run.

For every frozen count k: two epochs with the cache off (the second is timed), then two with
it on: one that fills the cache and one that reads it. Prints a table of ratios and writes JSON.

    python benchmarks/cache_epochs.py                       # MiniLM-L6, CPU, 512 sentences
    python benchmarks/cache_epochs.py --model DIR --data reviews.csv --frozen 0,3,6,9,12
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from pipetransformer import Config, Trainer, load_model
from pipetransformer.config import apply_overrides
from pipetransformer.data.load import load_data
from pipetransformer.data.sources import describe_data
from pipetransformer.engine import freeze_to


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--data", default="rotten-tomatoes")
    ap.add_argument("--train-samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--frozen", default="", help="comma-separated frozen counts (default: 0..L step 1)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args()
    base = apply_overrides(Config(), {"model": args.model, "data": args.data, "train_samples": args.train_samples,
                                      "eval_samples": args.batch_size, "batch_size": args.batch_size,
                                      "max_length": args.max_length, "freeze": "off", "epochs": 3})
    names = describe_data(base.data.data).label_names
    model = load_model(args.model, num_labels=len(names), label_names=names)
    data = load_data(base.data, model, args.max_length, seed=0, cache_dir=Path(tempfile.gettempdir()) / "pt-bench-data")
    counts = [int(k) for k in args.frozen.split(",")] if args.frozen else list(range(model.num_blocks + 1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    title = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}, {len(data[0])} samples, batch {args.batch_size}, {args.max_length} tokens; {title}")
    print(f"{'frozen':>6} {'no cache s':>10} {'fill s':>8} {'cached s':>9} {'speedup':>8}  tier")
    warm = Trainer(apply_overrides(base, {"cache": "off", "run_dir": f"/tmp/pt-bench-{time.time_ns()}"}),
                   model=model, data=data, progress=False)
    warm.train_epoch(0)  # untimed: kernels, allocator and thread pools warm up
    warm.close()
    rows = []
    for k in counts:
        row = {"frozen": k}
        for mode in ("off", "on"):
            cfg = apply_overrides(base, {"cache": mode, "run_dir": f"/tmp/pt-bench-{time.time_ns()}"})
            trainer = Trainer(cfg, model=model, data=data, progress=False)
            try:
                if k:
                    freeze_to(trainer, k)
                # two epochs each: the first of a new layout also builds its pipeline stage
                first, second = trainer.train_epoch(0), trainer.train_epoch(1)
                if mode == "off":
                    row["no_cache_s"] = second["epoch_seconds"]
                else:
                    row.update(fill_s=first["epoch_seconds"], cached_s=second["epoch_seconds"],
                               tier=second["cache_tier"], hits=second["cache_hits"])
            finally:
                trainer.close()
        row["speedup"] = row["no_cache_s"] / row["cached_s"]
        rows.append(row)
        print(f"{k:>6} {row['no_cache_s']:>10.2f} {row['fill_s']:>8.2f} {row['cached_s']:>9.2f} "
              f"{row['speedup']:>7.2f}x  {row['tier']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": title, "host": platform.node(), "rows": rows,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
