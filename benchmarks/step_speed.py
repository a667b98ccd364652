"""One training step, side by side in one run: a plain PyTorch loop against pipetransformer.

Rows (one process, one device, the same model, batch and optimizer settings):
  plain            the Hugging Face model in a plain loop: forward with labels, backward,
                   clip_grad_norm_, fused AdamW, zero_grad (bf16 autocast on CUDA)
  plain-compiled   the same loop over torch.compile(model)
  pt               pipetransformer's epoch loop, --freeze off --cache off
  pt-compiled      the same with --compile (compile time reported apart)
  pt-frozen-K      K blocks frozen, cache off
  pt-cached-K      K blocks frozen and their output cached (the second epoch reads it)

Each row times whole epochs of `--steps` steps after a warm-up epoch, so batch loading and
every piece of per-step host work count. Targets of issue 9 (GPU, BERT-base-sized, 64 x 128):
pt within 3 % of plain; pt-compiled >= 1.25x plain; pt-cached-9 >= 3x pt.

    python benchmarks/step_speed.py                    # CUDA: BERT-base-sized, batch 64 x 128
    python benchmarks/step_speed.py --size small       # CPU smoke test: MiniLM-sized, 8 x 32
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
         "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def token_rows(n: int, length: int, vocab: int, seed: int):
    """Random token rows with varied lengths, as a pipetransformer text data set."""
    import numpy as np

    from pipetransformer.data.dataset import TextData
    g = np.random.default_rng(seed)
    lengths = g.integers(length // 2, length + 1, n)
    ids = g.integers(1000, vocab, (n, length)) * (np.arange(length)[None] < lengths[:, None])
    return TextData(ids.astype(np.int32), lengths, np.arange(n), g.integers(0, 2, n), ["0", "1"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(hf_model, data, batch: int, steps: int, device, compiled: bool) -> tuple[float, float]:
    """ms per step of a plain loop over `steps` steps after a warm-up pass; compile seconds."""
    model = hf_model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    run = torch.compile(model) if compiled else model

    def epoch() -> float:
        start = time.perf_counter()
        for step in range(steps):
            b = data.batch(torch.arange(step * batch, (step + 1) * batch), device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = run(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                          labels=b["labels"].to(device, non_blocking=True))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - start
    warm = epoch()  # compiles, if compiled
    seconds = min(epoch() for _ in range(2))
    return 1000 * seconds / steps, warm - seconds if compiled else 0.0


def pt_loop(hf_model, data, batch: int, length: int, steps: int, frozen: int, cache: str,
            compiled: bool) -> tuple[float, float]:
    """ms per step of pipetransformer's epoch loop (one process), after a warm-up epoch; the
    seconds of compiling and of the transition to `frozen` blocks."""
    from pipetransformer import Config, Trainer
    from pipetransformer.config import apply_overrides
    from pipetransformer.engine import freeze_to
    from pipetransformer.models.loading import wrap_model
    model = wrap_model(hf_model)
    # model="minilm-l6" only names the run (fingerprint); the model object is the one timed
    cfg = apply_overrides(Config(), {"model": "minilm-l6", "freeze": "off", "cache": cache, "batch_size": batch,
                                     "epochs": 50, "compile": compiled, "max_length": length,
                                     "cache_host_fraction": 0.5, "lr": 1e-5,
                                     "run_dir": tempfile.mkdtemp(prefix="pt-step-")})
    trainer = Trainer(cfg, model=model, data=(data, data), progress=False)
    try:
        setup_s = trainer._warm_up()
        if frozen:
            setup_s += freeze_to(trainer, frozen)  # the transition, its compile included
        trainer.train_epoch(0)  # warm-up; with the cache on it fills the entries
        seconds = min(trainer.train_epoch(e)["epoch_seconds"] for e in (1, 2))
    finally:
        trainer.close()
    return 1000 * seconds / steps, setup_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="base on CUDA, small on CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="64 on CUDA, 8 on CPU")
    ap.add_argument("--max-length", type=int, default=None, help="128 on CUDA, 32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per epoch (40 on CUDA, 6 on CPU)")
    ap.add_argument("--frozen", default="", help="comma-separated frozen counts (default: 3/4 of the blocks)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    args = ap.parse_args()
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("base" if cuda else "small")
    batch, length = args.batch_size or (64 if cuda else 8), args.max_length or (128 if cuda else 32)
    steps = args.steps or (40 if cuda else 6)
    layers = SIZES[size]["num_hidden_layers"]
    frozen = [int(k) for k in args.frozen.split(",")] if args.frozen else [layers * 3 // 4]
    cfg = transformers.BertConfig(vocab_size=30522, num_labels=2, **SIZES[size])
    data = token_rows(steps * batch, length, cfg.vocab_size, seed=0)
    title = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"BERT {size} ({layers} x {cfg.hidden_size}), batch {batch} x {length} tokens, {steps} steps per "
          f"epoch, {title}, torch {torch.__version__}", flush=True)

    def fresh():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(cfg)
    rows: dict[str, dict] = {}

    def record(name: str, ms: float, setup_s: float = 0.0) -> None:
        rows[name] = {"ms_per_step": ms, "setup_seconds": setup_s}
        print(f"{name:>16}: {ms:8.2f} ms/step" + (f"  (compile/transition {setup_s:.1f} s)" if setup_s else ""),
              flush=True)
    record("plain", *plain_loop(fresh(), data, batch, steps, device, compiled=False))
    record("pt", *pt_loop(fresh(), data, batch, length, steps, 0, "off", compiled=False))
    for k in frozen:
        record(f"pt-frozen-{k}", *pt_loop(fresh(), data, batch, length, steps, k, "off", compiled=False))
        record(f"pt-cached-{k}", *pt_loop(fresh(), data, batch, length, steps, k, "on", compiled=False))
    if not args.skip_compile:
        record("plain-compiled", *plain_loop(fresh(), data, batch, steps, device, compiled=True))
        record("pt-compiled", *pt_loop(fresh(), data, batch, length, steps, 0, "off", compiled=True))
    plain, pt = rows["plain"]["ms_per_step"], rows["pt"]["ms_per_step"]
    ratios = {"pt_over_plain": pt / plain}
    print(f"pt / plain: {pt / plain:.3f} (target <= 1.03)")
    for k in frozen:
        ratios[f"pt_over_cached_{k}"] = pt / rows[f"pt-cached-{k}"]["ms_per_step"]
        print(f"pt / pt-cached-{k}: {ratios[f'pt_over_cached_{k}']:.2f}x (target >= 3 at 9 of 12)")
    if "pt-compiled" in rows:
        ratios["plain_over_pt_compiled"] = plain / rows["pt-compiled"]["ms_per_step"]
        print(f"plain / pt-compiled: {ratios['plain_over_pt_compiled']:.2f}x (target >= 1.25)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": title, "host": platform.node(), "size": size, "batch": batch, "length": length,
                       "steps": steps, "rows": rows, "ratios": ratios, "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
