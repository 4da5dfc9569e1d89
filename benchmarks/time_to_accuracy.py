"""Time to accuracy on CIFAR-10: the earlier CPU configuration beside the fast one, in one run.

Rows (each trained in its own child process, so each reports its own peak resident memory;
clean ACC evaluated after every epoch on the full 10,000-image test set, evaluation time
not counted as training time):

- ``simple-10k``: the earlier CPU configuration (10,000-image class-balanced subset,
  ``simple-cnn`` width 16, 15 epochs, batch 128, one-cycle SGD, label smoothing 0.1);
- ``fast-short``: ``fast-cnn`` (widths 16/64/64) on all 50,000 training images for 2 epochs
  at peak lr 0.75, the recipe meant to match the earlier configuration's accuracy in a third
  of its time;
- ``fast-50k``: ``fast-cnn`` (widths 24/96/96) on all 50,000 images for 15 epochs at peak lr
  0.375 (the target: 88% in 20 minutes on 2 cores);
- ``fast-short-bf16``, ``fast-50k-bf16``: the same two recipes under bfloat16 autocast
  (``amp = "on"``), trained only where the CPU computes bfloat16 natively (AVX512-BF16 or AMX;
  elsewhere they are skipped with a note, since emulated bfloat16 is many times slower), to show
  whether bfloat16 keeps the accuracy and what it saves;
- ``fast-wide-bf16``: ``fast-cnn`` at airbench's widths (64/256/256) under bfloat16 autocast,
  10 epochs at peak lr 0.375 (what the bfloat16 speed buys: a wider network in the same time;
  also only where the CPU has native bfloat16).

Both fast rows use the recipe of ``fast_recipe`` in ``_common.py``.

Before the rows, one SGD step's throughput is measured for the levers (channels-last
layout, batch size, widths, bfloat16 autocast where the CPU has it natively), all in this
process, so the ratios compare like with like.

    python benchmarks/time_to_accuracy.py            # about 30 minutes on 2 CPU cores
    python benchmarks/time_to_accuracy.py --only simple-10k fast-short

On a GPU (``--device cuda``) every row trains under bfloat16 autocast, since ``amp = "auto"``
means bfloat16 there; the ``-bf16`` rows differ from the others only on a CPU, and the
throughput table measures CPU steps only, so skip it::

    python benchmarks/time_to_accuracy.py --device cuda --no-levers \
        --only simple-10k fast-short fast-50k fast-wide-bf16 \
        --out benchmarks/results/time_to_accuracy_gpu.json

Prints tables and writes ``benchmarks/results/time_to_accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cifar10_tree, fast_recipe, cpu_recipe, print_table, read_json, run_recipe, write_json  # noqa: E402

ROWS = ("simple-10k", "fast-short", "fast-50k", "fast-short-bf16", "fast-50k-bf16", "fast-wide-bf16")
BF16_ROWS = ("fast-short-bf16", "fast-50k-bf16", "fast-wide-bf16")


def row_recipe(name: str, root: Path, args) -> dict:
    if name == "simple-10k":
        r = cpu_recipe(root, train_size=10000, epochs=15, width=16, device=args.device, seed=args.seed)
    elif name.startswith("fast-short"):
        r = fast_recipe(root, train_size=None, epochs=args.short_epochs, widths=args.short_widths,
                        lr=args.short_lr, device=args.device, seed=args.seed,
                        bn_lr_scale=args.short_bn_lr_scale)
    elif name == "fast-wide-bf16":
        r = fast_recipe(root, train_size=None, epochs=args.wide_epochs, widths=args.wide_widths, lr=args.wide_lr,
                        device=args.device, seed=args.seed, bn_lr_scale=args.bn_lr_scale)
    else:
        r = fast_recipe(root, train_size=None, epochs=args.epochs, widths=args.widths, lr=args.lr,
                        device=args.device, seed=args.seed, bn_lr_scale=args.bn_lr_scale)
    if name in BF16_ROWS:
        r["train"]["amp"] = "on"
    r["defense"] = {"name": "none", "evaluate_each_epoch": True}
    r["name"] = name
    return r


def train_row(name: str, root: Path, args) -> dict:
    """Train one row in this process; its curve, final ACC and peak memory."""
    recipe = row_recipe(name, root, args)
    out = REPO / "benchmarks" / "results" / "runs" / "time_to_accuracy" / name
    t0 = time.perf_counter()
    metrics = run_recipe(recipe, out, progress=args.progress)
    wall = time.perf_counter() - t0
    curve, train_s = [], 0.0
    for line in (out / "history.jsonl").read_text().splitlines():
        h = json.loads(line)
        if h.get("stage") != "train" or "seconds" not in h:
            continue
        train_s += h["seconds"]
        curve.append({"epoch": h["epoch"], "train_seconds": round(train_s, 1),
                      "clean_acc": round(100 * h["clean_acc"], 2), "images_per_s": round(h["images_per_s"], 1)})
    return {"row": name, "recipe": recipe, "clean_acc": round(100 * metrics["clean_acc"], 2),
            "flip_tta_acc": round(100 * flip_tta_accuracy(out, args.device), 2),
            "train_seconds": round(train_s, 1), "wall_seconds": round(wall, 1), "curve": curve,
            # the run's own record (runner.peak_memory): this child process's peaks, GPU only on CUDA
            **{f"peak_{k}_mb": round(v, 1) for k, v in metrics["peak_memory_mb"].items()}}


def flip_tta_accuracy(run_dir: Path, device: str) -> float:
    """Clean test accuracy of a finished run's model with flip test-time augmentation (logits
    averaged over each image and its mirror image). Reported beside the plain accuracy only:
    bdframe does not evaluate this way, because averaging over a mirror image also weakens
    asymmetric triggers, so ASR would no longer measure the model's backdoor alone."""
    import torch

    from bdframe.nn import resolve_device
    from bdframe.scan import load_run

    dev = resolve_device(device)
    parts, model = load_run(run_dir, device=dev)
    test, correct = parts.test, 0
    with torch.no_grad():
        for i in range(0, len(test), 500):
            x = test.images[i:i + 500].to(dev).float() / 255
            logits = model(x) + model(x.flip(-1))
            correct += int((logits.argmax(1).cpu() == test.labels[i:i + 500]).sum())
    return correct / len(test)


def step_throughput(widths=None, *, simple_width=None, batch=256, channels_last=True, amp=False, compile=False,
                    steps=8) -> float:
    """Images per second of SGD steps (forward, backward, update) on random 32x32 inputs: the
    best of three timings of ``steps`` steps each, after two untimed steps (which include any
    compilation). Best-of-three, because other work on a shared machine only ever slows a
    timing down."""
    import torch
    import torch.nn.functional as F

    from bdframe_models_cifar.nets import FastNet, SimpleCNNNet

    torch.manual_seed(0)
    net = SimpleCNNNet(3, 10, simple_width) if simple_width else FastNet(3, 10, widths)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    else:
        net.channels_last = False
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    if compile:
        net = torch.compile(net)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    def run(n):
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    run(2)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        run(steps)
        best = max(best, batch * steps / (time.perf_counter() - t))
    return best


def levers() -> list[dict]:
    from bdframe.training import cpu_bf16_supported

    bf16 = cpu_bf16_supported()
    rows = []
    base = step_throughput(simple_width=16)
    w = (24, 96, 96)
    specs = [("simple-cnn w16 (earlier configuration)", dict(simple_width=16)),
             ("simple-cnn w16, bfloat16 autocast", dict(simple_width=16, amp=True)),
             ("fast-cnn 16/64/64", dict(widths=(16, 64, 64))),
             ("fast-cnn 24/96/96", dict(widths=w)),
             ("fast-cnn 32/128/128", dict(widths=(32, 128, 128))),
             ("fast-cnn 64/256/256", dict(widths=(64, 256, 256), steps=4)),
             ("fast-cnn 24/96/96, no channels-last", dict(widths=w, channels_last=False)),
             ("fast-cnn 24/96/96, batch 128", dict(widths=w, batch=128, steps=12)),
             ("fast-cnn 24/96/96, batch 512", dict(widths=w, batch=512, steps=4)),
             ("fast-cnn 24/96/96, bfloat16 autocast", dict(widths=w, amp=True)),
             ("fast-cnn 16/64/64, bfloat16 autocast", dict(widths=(16, 64, 64), amp=True)),
             ("fast-cnn 32/128/128, bfloat16 autocast", dict(widths=(32, 128, 128), amp=True)),
             ("fast-cnn 64/256/256, bfloat16 autocast", dict(widths=(64, 256, 256), amp=True, steps=4)),
             ("fast-cnn 24/96/96, torch.compile", dict(widths=w, compile=True))]
    for label, kw in specs:
        if kw.get("amp") and not bf16:
            rows.append({"lever": label, "images_per_s": None, "ratio": None,
                         "note": "skipped: no native bfloat16 on this CPU (emulated, many times slower)"})
            continue
        try:
            r = base if kw == {"simple_width": 16} else step_throughput(**kw)
        except Exception as e:  # e.g. torch.compile without a working C++ compiler
            rows.append({"lever": label, "images_per_s": None, "ratio": None,
                         "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        rows.append({"lever": label, "images_per_s": round(r, 1), "ratio": round(r / base, 2), "note": ""})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="CIFAR-10 image-folder tree or cifar10-jpeg.tar.gz (default: ../shared)")
    ap.add_argument("--only", nargs="+", choices=ROWS, help="train only these rows (others kept from the JSON)")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of the fast-50k row")
    ap.add_argument("--widths", type=int, nargs=3, default=[24, 96, 96], help="fast-cnn widths of the fast-50k row")
    ap.add_argument("--lr", type=float, default=0.375, help="peak lr of the fast-50k row")
    ap.add_argument("--short-epochs", type=int, default=2, help="epochs of the fast-short row")
    ap.add_argument("--short-lr", type=float, default=0.75, help="peak lr of the fast-short row")
    ap.add_argument("--bn-lr-scale", type=float, default=64.0, help="fast-cnn bn_lr_scale of the fast-50k row")
    ap.add_argument("--short-bn-lr-scale", type=float, default=64.0, help="fast-cnn bn_lr_scale of the fast-short row")
    ap.add_argument("--short-widths", type=int, nargs=3, default=[16, 64, 64],
                    help="fast-cnn widths of the fast-short row")
    ap.add_argument("--wide-epochs", type=int, default=10, help="epochs of the fast-wide-bf16 row")
    ap.add_argument("--wide-widths", type=int, nargs=3, default=[64, 256, 256],
                    help="fast-cnn widths of the fast-wide-bf16 row")
    ap.add_argument("--wide-lr", type=float, default=0.375, help="peak lr of the fast-wide-bf16 row")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-levers", action="store_true", help="skip the throughput table")
    ap.add_argument("--levers-only", action="store_true", help="measure only the throughput table")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "time_to_accuracy.json"))
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: train one row, write JSON to --row-out
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = cifar10_tree(args.data)
    if args.row:
        write_json(Path(args.row_out), train_row(args.row, root, args))
        return 0

    out = Path(args.out)
    results = read_json(out, {})
    import torch

    from bdframe.nn import resolve_device
    from bdframe.runner import cpu_name
    from bdframe.training import cpu_bf16_supported

    device = resolve_device(args.device)
    results["machine"] = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "native_bfloat16": cpu_bf16_supported(), "device": device.type}
    if device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(device)
        results["machine"]["cuda"] = torch.version.cuda
    # bfloat16 rows are skipped only where they would run emulated: on a CPU without native bfloat16
    emulated_bf16 = device.type == "cpu" and not cpu_bf16_supported()
    if not args.no_levers:
        results["levers"] = levers()
        write_json(out, results)
    rows = results.setdefault("rows", {})
    for name in ([] if args.levers_only else (args.only or ROWS)):
        if name in BF16_ROWS and emulated_bf16:
            print(f"{name}: skipped, this CPU has no native bfloat16 (emulated, many times slower)", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row_out = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, "--row", name, "--row-out", str(row_out), "--data", str(root),
                   "--epochs", str(args.epochs), "--short-epochs", str(args.short_epochs),
                   "--widths", *map(str, args.widths), "--short-widths", *map(str, args.short_widths),
                   "--lr", str(args.lr), "--short-lr", str(args.short_lr),
                   "--wide-epochs", str(args.wide_epochs), "--wide-widths", *map(str, args.wide_widths),
                   "--wide-lr", str(args.wide_lr),
                   "--bn-lr-scale", str(args.bn_lr_scale), "--short-bn-lr-scale", str(args.short_bn_lr_scale),
                   "--device", args.device, "--seed", str(args.seed)] + (["--progress"] if args.progress else [])
            subprocess.run(cmd, check=True)
            rows[name] = json.loads(row_out.read_text())
        write_json(out, results)

    if results.get("levers"):
        print("\nOne SGD step's throughput (random 32x32 inputs, batch 256 unless stated)")
        print_table(results["levers"], [("lever", "lever", "{}"), ("images_per_s", "img/s", "{:.0f}"),
                                        ("ratio", "x earlier", "{:.2f}"), ("note", "note", "{}")])
    base = rows.get("simple-10k")
    table = []
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        row = {"row": name, "images": r["recipe"]["dataset"].get("train_size") or 50000,
               "epochs": r["recipe"]["train"]["epochs"], "clean_acc": r["clean_acc"],
               "flip_tta_acc": r.get("flip_tta_acc"), "train_s": r["train_seconds"], "peak_rss_mb": r["peak_rss_mb"],
               "peak_gpu_mb": r.get("peak_gpu_mb")}
        if base:
            row["time_ratio"] = r["train_seconds"] / base["train_seconds"]
            hit = next((c for c in r["curve"] if c["clean_acc"] >= base["clean_acc"]), None)
            row["to_base_acc_s"] = hit["train_seconds"] if hit else None
            row["to_base_ratio"] = hit["train_seconds"] / base["train_seconds"] if hit else None
        hit88 = next((c for c in r["curve"] if c["clean_acc"] >= 88.0), None)
        row["to_88_s"] = hit88["train_seconds"] if hit88 else None
        table.append(row)
    print("\nTime to accuracy (training seconds, evaluation excluded; ratios against simple-10k in this run)")
    print_table(table, [("row", "row", "{}"), ("images", "train images", "{}"), ("epochs", "epochs", "{}"),
                        ("clean_acc", "final ACC %", "{:.2f}"), ("flip_tta_acc", "with flip TTA %", "{:.2f}"),
                        ("train_s", "train s", "{:.0f}"),
                        ("time_ratio", "x simple-10k time", "{:.2f}"),
                        ("to_base_acc_s", "s to simple-10k's ACC", "{:.0f}"),
                        ("to_base_ratio", "x simple-10k time to its ACC", "{:.2f}"),
                        ("to_88_s", "s to 88%", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]
                + ([("peak_gpu_mb", "peak GPU MB", "{:.0f}")] if any("peak_gpu_mb" in r for r in rows.values()) else []))
    for name in ROWS:
        if name in rows:
            print(f"\n{name} curve: " + ", ".join(f"{c['train_seconds']:.0f}s {c['clean_acc']:.2f}%"
                                                  for c in rows[name]["curve"]))
    results["table"] = table
    write_json(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
