"""DBR's rows of a sweep beyond what ``bdframe report`` shows: the model ``d-br`` repaired, where
the time goes, the wall-time multiple measured on one machine, and the per-round trend.

``bdframe report`` divides a run's seconds by those of its row's no-defense run, and leaves the
multiple out where the two runs were not made on one machine. A ``d-br`` run that trains its
starting model itself (no ``model = ...``) does so exactly as a no-defense run does, so it carries
a same-machine reference: its own ``train`` stage. Per attack row of a sweep directory this prints

- for the ``--br`` column (default ``d-br``): the model it repaired (ACC / ASR), the result, the
  seconds of its plain training, of the FCT split (the scoring model and the scores: the rest of
  the defense's seconds), of the repair rounds and of their training passes alone (from the
  run's history), the run's total, and the multiple
  ``total / plain training`` (only where the run trained its starting model);
- for the ``--st`` column (default ``d-st``): the result, its SS-CTL and head seconds, its total,
  and the multiple ``total / the same row's d-br plain training``, given only when both runs
  record the same CPU and thread count in ``run.json``;
- then, for ``d-br`` runs that logged every round (``evaluate_each_round = true``), ACC / ASR
  after each round (reporting only: the defense keeps the last round), with the model's
  accuracy on its suspected-poisoned set where the run logged it (what ``plateau_rounds`` watches).

    bdframe sweep run benchmarks/sweeps/meca-cifar10.toml --only defense=d-br --only defense=d-st
    python benchmarks/dbr_rows.py benchmarks/results/sweeps/meca-cifar10
    python benchmarks/dbr_rows.py --br d-br-matched --out benchmarks/results/dbr_rows_matched.json

``--replay plateau_rounds=5 plateau_fall=0.05`` (any of ``plateau_rounds``, ``plateau_share``,
``plateau_fall``; the others keep the defense's defaults) also replays ``d-br``'s stopping rule
with those settings on every run of the column that logged every round: the round where the
rule would have stopped the repair, read from the run's own fit figures, and the ACC / ASR the
run logged after that round. A run is deterministic and the rule only decides when to stop, so
a run with those settings would have reached that round with these figures. Where the rule
does not hold within the logged rounds, the replay gives the run's last round if the run went
to its ``rounds`` cap (the rule's cap too), and nothing if the run itself stopped earlier.

The figures are written to ``results/dbr_rows.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, parse_key_values, print_table, sweep_dir_problem, write_json  # noqa: E402


def _runs(sweep: Path) -> tuple[list, dict]:
    """The sweep's attack labels and its finished runs by (attack, defense) label."""
    from bdframe.report import FINISHED, load_runs

    _, axes, runs = load_runs(sweep)
    return axes["attack"], {(r.labels["attack"], r.labels["defense"]): r for r in runs if r.status == FINISHED}


def _defense(run) -> dict:
    """The ``[defense]`` table of the run's resolved recipe ({} where the run has none)."""
    recipe = run.dir / "recipe.toml"
    return tomllib.loads(recipe.read_text()).get("defense", {}) if recipe.is_file() else {}


def _step_seconds(run, rounds: int) -> float:
    """The seconds of the repair's training passes (unlearning and relearning) up to ``rounds``,
    from the run's history: the repair without its per-round test passes, fit measurements and
    checkpoints."""
    import json

    total = 0.0
    for line in (run.dir / "history.jsonl").read_text().splitlines():
        e = json.loads(line)
        stage = e.get("stage", "")
        if stage.startswith("dbr-round-") and stage.endswith(("-unlearn", "-relearn")) \
                and int(stage.split("-")[2]) <= rounds:
            total += e.get("seconds", 0.0)
    return total


def _pct(x):
    return None if x is None else 100 * x


def rows_of(sweep: Path, br_label: str, st_label: str) -> list[dict]:
    from bdframe.report import hardware

    attacks, finished = _runs(sweep)
    rows = []
    for attack in attacks:
        br, st = finished.get((attack, br_label)), finished.get((attack, st_label))
        if br is None and st is None:
            continue
        row = {"attack": attack}
        train = None
        if br is not None:
            m = br.metrics
            dm = m["defense_metrics"]
            stages = dm["stage_seconds"]
            defense = _defense(br)
            train = None if defense.get("model") else stages["train"]  # a saved model was repaired
            trend = dm["trend"]
            row["cap"] = int(defense.get("rounds", 20))
            row.update(start_acc=_pct(trend[0].get("clean_acc")), start_asr=_pct(trend[0].get("asr")),
                       br_acc=_pct(m["clean_acc"]), br_asr=_pct(m.get("asr")), br_train_s=train,
                       br_split_s=None if br.resumed else m["seconds"]["defense"] - stages["train"] - stages["repair"],
                       br_repair_s=stages["repair"], br_steps_s=_step_seconds(br, dm.get("rounds", trend[-1]["round"])),
                       br_fit_s=stages.get("fit"), br_total_s=None if br.resumed else m["seconds"]["total"],
                       br_multiple=None if train is None or br.resumed else m["seconds"]["total"] / train,
                       br_rounds=dm.get("rounds", trend[-1]["round"]), br_cpu=(br.environment or {}).get("cpu"),
                       trend=[{"round": t["round"], "acc": _pct(t.get("clean_acc")), "asr": _pct(t.get("asr")),
                               "fit": _pct(t.get("fit_poisoned"))}
                              for t in trend] if len(trend) > 2 else None)
        if st is not None:
            m = st.metrics
            stages = m["defense_metrics"]["stage_seconds"]
            same = train is not None and not (st.resumed or br.resumed) and hardware(st) is not None and hardware(st) == hardware(br)
            row.update(st_acc=_pct(m["clean_acc"]), st_asr=_pct(m.get("asr")), st_ss_ctl_s=stages["ss_ctl"],
                       st_linear_s=stages["linear"], st_total_s=None if st.resumed else m["seconds"]["total"],
                       st_multiple=m["seconds"]["total"] / train if same else None,
                       st_cpu=(st.environment or {}).get("cpu"))
        rows.append(row)
    return rows


REPLAY_KEYS = ("plateau_rounds", "plateau_share", "plateau_fall")


def replay(row: dict, c) -> dict | None:
    """Where ``d-br``'s stopping rule with the settings of ``c`` (a ``DBRConfig``) stops on a
    run's logged per-round fit figures (see the module text), with that round's logged figures;
    None where unknown."""
    from bdframe.steps import plateaued

    trend = row.get("trend") or []
    if not trend or [t["round"] for t in trend] != list(range(len(trend))) or None in [t["fit"] for t in trend]:
        return None
    fits = [t["fit"] / 100 for t in trend]
    stop = next((r for r in range(1, len(fits))
                 if plateaued(fits[: r + 1], c.plateau_rounds, c.plateau_share, c.plateau_fall)), None)
    if stop is None and trend[-1]["round"] == row["cap"]:
        stop = row["cap"]
    if stop is None:
        return None
    return {"attack": row["attack"], "logged_rounds": trend[-1]["round"], "stop": stop,
            "acc": trend[stop]["acc"], "asr": trend[stop]["asr"], "fit": trend[stop]["fit"],
            "fit_start": trend[0]["fit"]}


def _trend_cell(t: dict) -> str:
    cell = f"{t['acc']:.2f} / " + (f"{t['asr']:.2f}" if t["asr"] is not None else "-")
    return cell if t.get("fit") is None else f"{cell} ({t['fit']:.1f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", nargs="?", default=str(REPO / "benchmarks/results/sweeps/meca-cifar10"))
    ap.add_argument("--br", default="d-br", help="the defense label of the d-br column (default d-br)")
    ap.add_argument("--st", default="d-st", help="the defense label of the d-st column (default d-st)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dbr_rows.json"))
    ap.add_argument("--replay", nargs="+", metavar="KEY=VALUE",
                    help="replay d-br's stopping rule with these settings on the runs that logged every round")
    args = ap.parse_args(argv)
    settings = parse_key_values(args.replay or [], "--replay ")
    bad = sorted(set(settings) - set(REPLAY_KEYS))
    if bad:
        print(f"error: --replay {bad[0]}: not a setting of the stopping rule; allowed: {', '.join(REPLAY_KEYS)}",
              file=sys.stderr)
        return 2
    rule = None
    if args.replay:
        from bdframe_defense_dbr.plugin import DBRConfig

        for key, value in settings.items():
            try:
                DBRConfig(**{key: value})
            except (TypeError, ValueError) as e:
                print(f"error: --replay {key}: {e}", file=sys.stderr)
                return 2
        rule = DBRConfig(**settings)
    sweep = Path(args.sweep_dir)
    problem = sweep_dir_problem(sweep, "dbr_rows.py") or (
        None if (rows := rows_of(sweep, args.br, args.st)) else
        f"dbr_rows.py: {str(sweep)!r} has no finished {args.br} or {args.st} run")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    br, st = args.br, args.st
    print_table(rows, [("attack", "attack", "{}"), ("start_acc", "repaired ACC", "{:.2f}"),
                       ("start_asr", "ASR", "{:.2f}"), ("br_acc", f"{br} ACC", "{:.2f}"), ("br_asr", "ASR", "{:.2f}"),
                       ("br_rounds", "rounds", "{}"), ("br_train_s", "train s", "{:.0f}"), ("br_split_s", "split s", "{:.0f}"),
                       ("br_repair_s", "repair s", "{:.0f}"), ("br_steps_s", "steps s", "{:.0f}"),
                       ("br_fit_s", "fit s", "{:.0f}"), ("br_total_s", "total s", "{:.0f}"),
                       ("br_multiple", "x", "{:.2f}"), ("st_acc", f"{st} ACC", "{:.2f}"), ("st_asr", "ASR", "{:.2f}"),
                       ("st_ss_ctl_s", "SS-CTL s", "{:.0f}"), ("st_linear_s", "head s", "{:.0f}"),
                       ("st_total_s", "total s", "{:.0f}"), ("st_multiple", "x", "{:.2f}"),
                       ("br_cpu", f"{br} CPU", "{}"), ("st_cpu", f"{st} CPU", "{}")])
    print(f"x: total seconds over the {br} run's own plain training (the row's no-defense training, made in the "
          f"same run); '-' where the run loaded its model, was resumed (run.json: its seconds are those of its last "
          f"attempt), or the two runs do not record one CPU. repair s: the "
          f"rounds, with their test passes where ACC/ASR were logged each round; steps s: its training passes alone; "
          f"fit s: measuring the fit of the split's sets (recorded by newer runs)")
    trends = [r for r in rows if r.get("trend")]
    if trends:
        print(f"\n{br}: ACC / ASR after each round (round 0: the model it repairs); in brackets, where the run "
              f"logged it, its accuracy on its own suspected-poisoned set (training data, given labels)")
        rounds = max(len(r["trend"]) for r in trends)
        table = [{"round": i, **{r["attack"]: _trend_cell(r["trend"][i]) if i < len(r["trend"]) else None
                                 for r in trends}} for i in range(rounds)]
        print_table(table, [("round", "round", "{}")] + [(r["attack"], r["attack"], "{}") for r in trends])
    replayed = None
    if args.replay:
        replayed = [r for r in (replay(row, rule) for row in rows if "cap" in row) if r]
        print(f"\n{br} replayed with {' '.join(args.replay)}: where the rule stops on each run's own per-round "
              f"fit, and the ACC / ASR the run logged after that round")
        print_table(replayed, [("attack", "attack", "{}"), ("logged_rounds", "rounds logged", "{}"),
                               ("stop", "stops after", "{}"), ("acc", "ACC", "{:.2f}"), ("asr", "ASR", "{:.2f}"),
                               ("fit_start", "fit at round 0", "{:.1f}"), ("fit", "fit there", "{:.1f}")])
        unknown = [row["attack"] for row in rows if "cap" in row and row.get("trend")
                   and row["attack"] not in {r["attack"] for r in replayed}]
        if unknown:
            print(f"not decided within the logged rounds (the run stopped earlier by its own rule): "
                  f"{', '.join(unknown)}")
    write_json(Path(args.out), {"sweep": str(sweep), "br": br, "st": st, "rows": rows,
                                **({"replay": {"settings": settings, "rows": replayed}} if args.replay else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
