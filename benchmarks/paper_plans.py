"""The paper's setting, simulated: 16 GPUs (2 machines x 8) for a ViT-B/16-sized and a
BERT-base-sized model, next to the paper's speedups (2.83x ImageNet, 2.44x CIFAR-100, 2.10x
SQuAD). No GPU and no download: random-init models built from transformers configs are
profiled on this CPU (small batches), and `pipetransformer.planner.predict` scales the
profile to the GPUs described below. Writes the profiles into --out and prints markdown.

    python benchmarks/paper_plans.py --out benchmarks/results

Assumptions (stated again in RESULTS.md): Quadro RTX 5000-class GPUs, 16 GB, taken to run
the profiled work GPU_TFLOPS / (this CPU's measured fp32 GEMM rate) times faster; a fixed
CALL_US of launch overhead per unit call; PCIe within a machine, 100 Gb/s between machines;
the run starts as the paper's baseline, 8 stages x 2 replicas (one pipeline per machine);
frozen blocks follow the alpha cap (the adaptive rule's fastest pace).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import transformers

from pipetransformer.config import Config, apply_overrides
from pipetransformer.costs import Hardware, Profile, read_profile, write_profile
from pipetransformer.models.loading import wrap_model
from pipetransformer.planner import predict
from pipetransformer.profiling import measure_profile

GPU_TFLOPS = 5.6   # RTX 5000: 11.2 TFLOPS fp32 peak, taken at half in training
CALL_US = 100.0    # kernel launches per unit call (forward or backward)
HARDWARE = Hardware(devices=16, per_node=8, memory_gb=16.0, intra_gb_s=6.0, inter_gb_s=10.0, latency_us=20.0,
                    host_memory_gb=256.0, host_gb_s=10.0, disk_gb_s=1.0, gpu=True, call_overhead_us=CALL_US)

# name, model, rows' side, training rows, global batch, epochs, alphas, the paper's speedup
CASES = [
    ("ViT-B/16, ImageNet", "vit-b16-1000", 224, 1_281_167, 512, 10, (1 / 3,), "2.83x"),
    ("ViT-B/16, CIFAR-100", "vit-b16-100", 224, 50_000, 512, 10, (1 / 5, 1 / 4, 1 / 3, 2 / 5, 1 / 2),
     ("2.04x", "2.44x", "2.83x", "3.29x", "3.86x")),  # the paper's alpha sweep
    ("BERT-base-sized, SQuAD 1.1 (384 tokens)", "bert-base", 384, 88_641, 64, 3, (1 / 3,), "2.10x (BERT-large)"),
    ("BERT-base-sized, SQuAD 1.1 (384 tokens)", "bert-base", 384, 88_641, 64, 10, (1 / 3,), "2.10x (BERT-large)"),
]


def build(name: str):
    torch.manual_seed(0)
    if name.startswith("vit"):
        vit = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)
        vit.num_labels = int(name.rsplit("-", 1)[1])
        return wrap_model(transformers.ViTForImageClassification(vit))
    bert = transformers.BertConfig()  # BERT-base: 12 x 768, 30,522 tokens; 2 labels
    return wrap_model(transformers.BertForSequenceClassification(bert))


def cpu_gemm_flops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best


def profile(name: str, side: int, out: Path) -> Profile:
    path = out / f"profile_{name}_cpu.json"
    if path.exists():
        return read_profile(path)
    model = build(name)
    prof = measure_profile(model, name, (1, 4), side, "cpu")
    write_profile(prof, path)
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="folder for the profiles (reused if present)")
    ap.add_argument("--speed", type=float, default=0.0, help="GPU speed relative to this CPU (default: "
                    "GPU_TFLOPS over the CPU's fp32 GEMM rate, measured now)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    speed = args.speed
    if not speed:
        flops = cpu_gemm_flops()
        speed = GPU_TFLOPS * 1e12 / flops
        print(f"CPU fp32 GEMM {flops / 1e9:.0f} GFLOP/s ({torch.get_num_threads()} threads) -> GPU speed {speed:.0f}x")
    hardware = dataclasses.replace(HARDWARE, speed=speed)
    print("| task | alpha | epochs | batch | frozen per epoch | layout per epoch | cache | planned vs a1 (8x2 "
          "GPipe + DP) | planned vs a2 (16 replicas) | paper |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for title, name, side, rows, batch, epochs, alphas, paper in CASES:
        prof = profile(name, side, out)
        for i, alpha in enumerate(alphas):
            cfg = apply_overrides(Config(), {"epochs": epochs, "batch_size": batch, "freeze": "schedule",
                                             "alpha": alpha, "stages": 8, "train_samples": rows})
            pred = predict(prof, hardware, cfg, rows)
            frozen = ",".join(str(e.frozen_layers) for e in pred.epochs)
            layouts = ",".join(f"{e.stages}x{e.replicas}" for e in pred.epochs)
            tiers = sorted({e.cache_tier for e in pred.epochs if e.cache != "off"}) or ["off"]
            fits = "" if all(e.fits for e in (*pred.epochs, *pred.a1, *pred.a2)) else " (memory exceeded)"
            print(f"| {title} | {alpha:.2g} | {epochs} | {batch} | {frozen} | {layouts} | {'/'.join(tiers)} | "
                  f"{pred.speedup_over_a1:.2f}x{fits} | {pred.speedup_over_a2:.2f}x | "
                  f"{paper if isinstance(paper, str) else paper[i]} |", flush=True)


if __name__ == "__main__":
    main()
