"""The ``bdframe`` command line: run, validate, plugins, poison, scan, sweep, report, --version.

User errors print one message to stderr and exit with status 2; no traceback, no run
directory left behind (runs are written to ``<dir>.partial`` until they complete).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bdframe
from bdframe.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bdframe", description="Backdoor attacks and defenses from TOML recipes.")
    p.add_argument("--version", action="version", version=f"bdframe {bdframe.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe: poison, train/defend, report ACC and ASR")
    r.add_argument("recipe", help="path to a recipe .toml file")
    r.add_argument("--out", help="run directory (default: <output_dir>/<name> from the recipe)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--seed", type=int, help="override the recipe's seed")
    r.add_argument("--device", help="override the recipe's device (auto, cpu, cuda, cuda:N, mps)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.add_argument("--print", dest="print_resolved", action="store_true",
                   help="print the resolved recipe with every default filled in")

    pl = sub.add_parser("plugins", help="list installed plugins and their components")
    pl.add_argument("--json", action="store_true", help="machine-readable output")

    from bdframe import poison, report, scan, sweep

    poison.add_parser(sub)
    scan.add_parser(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    return p


def cmd_run(args) -> int:
    from bdframe import runner

    from bdframe.plugins import load_recipe

    recipe, registry = load_recipe(args.recipe, {"seed": args.seed, "device": args.device})
    metrics = runner.run(recipe, registry, out=Path(args.out) if args.out else None, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.quiet,
                         log=lambda m: print(m, file=sys.stderr))
    print(f"run complete: {metrics['run_dir']}")
    line = f"clean ACC {100 * metrics['clean_acc']:.2f}%"
    if "asr" in metrics:
        line += f"   ASR {100 * metrics['asr']:.2f}% (on {metrics['asr_set_size']} triggered test images)"
    print(line)
    if "detection" in metrics:
        d = metrics["detection"]
        print(f"detection: flagged {d['flagged']}, recall {100 * d['recall']:.2f}%, "
              f"precision {100 * d['precision']:.2f}%")
    for line in metrics.get("defense_summary", []):
        print(line)
    return 0


def cmd_validate(args) -> int:
    from bdframe.nn import device_problem
    from bdframe.plugins import load_recipe
    from bdframe.runs import output_problem

    recipe, _ = load_recipe(args.recipe)
    # what `bdframe run` would refuse on this machine before training: the output path, the device
    problem = output_problem(Path(recipe.output_dir) / recipe.name, "$.output_dir") or device_problem(recipe.device)
    if problem:
        raise UserError(problem)
    if args.print_resolved:
        print(recipe.to_toml(), end="")
    else:
        print(f"{args.recipe}: ok")
    return 0


def cmd_plugins(args) -> int:
    from bdframe.config import describe_fields
    from bdframe.plugins import load_registry

    registry = load_registry()
    if args.json:
        comps = []
        for e in registry.entries():
            comps.append({"kind": e.kind, "name": e.name, "plugin": e.provider.plugin,
                          "distribution": e.provider.distribution, "version": e.provider.version,
                          "class": f"{e.cls.__module__}.{e.cls.__qualname__}",
                          "params": {n: {"type": t, "default": d if isinstance(d, (int, float, str, bool, list, tuple, type(None))) else repr(d)}
                                     for n, t, d, _ in describe_fields(e.cls.Config)}})
        dists = {}
        for e in registry.entries():
            dists.setdefault(e.provider.plugin, {"plugin": e.provider.plugin, "distribution": e.provider.distribution,
                                                 "version": e.provider.version, "components": []})
            dists[e.provider.plugin]["components"].append(f"{e.kind}:{e.name}")
        print(json.dumps({"bdframe": bdframe.__version__, "plugins": list(dists.values()), "components": comps,
                          "failed": [{"plugin": n, "error": m} for n, m in registry.failed]}, indent=2))
        return 0
    rows = [(e.kind, e.name, e.provider.distribution or e.provider.plugin, e.provider.version or "")
            for e in registry.entries()]
    head = ("KIND", "NAME", "DISTRIBUTION", "VERSION")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, err in registry.failed:
        print(f"warning: plugin {name} failed to load: {err}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        from bdframe import poison, report, scan, sweep

        return {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "scan": scan.main,
                "poison": poison.main, "sweep": sweep.main, "report": report.main}[args.command](args)
    except UserError as e:
        print(f"bdframe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bdframe: interrupted; continue with `bdframe run RECIPE --resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
