"""The core's shape: no import cycles, kinds as one table, registration checked at discovery,
one materialisation path for run/scan/poison, and a defense context exactly as documented."""

import ast
import csv
import json
import re
import types
from pathlib import Path

import attrs
import pytest
import torch

from helpers import TINY
from bdframe import hookimpl, hookspecs
from bdframe.cli import main
from bdframe.interfaces import (KIND_TABLE, SECTIONS, Attack, Checkpoint, DefenseContext, EmptyConfig,
                                SampleScorer)
from bdframe.plugins import load_recipe, load_registry

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "core" / "src" / "bdframe"


def import_graph() -> dict[str, set[str]]:
    """Module -> core modules it imports anywhere in its text (module level or in functions)."""
    mods = {p.stem for p in CORE.glob("*.py")}
    graph = {}
    for p in CORE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "bdframe":
                    deps |= {a.name for a in node.names if a.name in mods}
                elif node.module.startswith("bdframe."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bdframe.")}
        graph[p.stem] = deps - {p.stem}
    return graph


def test_core_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert graph["recipe"].isdisjoint({"plugins", "registry"}), "recipes get their registry passed in"


def test_kinds_are_one_table():
    specs = {n for n in dir(hookspecs) if n.startswith("bdframe_")}
    assert specs == {k.hook for k in KIND_TABLE}  # one hookspec per row, no other
    for k in KIND_TABLE:
        assert callable(getattr(hookspecs, k.hook)), k
        assert k.interface.kind == k.name and k.when_missing in ("error", "nothing", "default")
    assert list(SECTIONS) == ["dataset", "model", "attack", "train", "defense"]
    core_text = "\n".join(p.read_text() for p in CORE.glob("*.py"))
    for plugin_name in ('"standard"', '"none"'):  # the core does not name plugins it does not ship
        assert not re.search(rf"default\w*\s*=\s*{plugin_name}", core_text), plugin_name


def test_default_components_come_from_the_plugins(bdframe_registry):
    assert bdframe_registry.default("trainer") == "standard" and bdframe_registry.default("defense") == "none"
    assert bdframe_registry.default("attack") is None


# -- registration checks -------------------------------------------------------------------------

@attrs.frozen
class _Cfg:
    x: int = 1


_Mutable = attrs.define(type("_Mutable", (), {"__annotations__": {"x": int}, "x": 1}))


def component(base, name, **attrs_):
    return type(name.title().replace("-", ""), (base,), {"name": name, **attrs_})


GoodScorer = component(SampleScorer, "good-scorer", Config=_Cfg)
NoConfig = component(SampleScorer, "no-config", Config=dict)
MutableConfig = component(SampleScorer, "mutable-config", Config=_Mutable)
NotAnAttack = component(object, "not-an-attack", kind="attack", Config=EmptyConfig)
FirstDefault = component(Attack, "first-default", default=True)
SecondDefault = component(Attack, "second-default", default=True)


def plugin(hook: str, *classes) -> types.ModuleType:
    mod = types.ModuleType(f"bad_plugin_{hook}_{classes[0].__name__}")

    def register(registry):
        for c in classes:
            registry.add(c)

    setattr(mod, hook, hookimpl(register, specname=hook))
    return mod


@pytest.mark.parametrize("hook, cls, message", [
    ("bdframe_register_attacks", GoodScorer, "is registered by bdframe_register_attacks but is not a Attack"),
    ("bdframe_register_scorers", NoConfig, "Config must be a frozen attrs class"),
    ("bdframe_register_scorers", MutableConfig, "Config must be frozen"),
    ("bdframe_register_attacks", NotAnAttack, "is not a Attack"),
])
def test_a_component_that_breaks_the_contract_is_refused_naming_the_plugin(hook, cls, message):
    mod = plugin(hook, cls)
    reg = load_registry(plugins=[mod], autoload=False)
    kind = next(k.name for k in KIND_TABLE if k.hook == hook)
    assert not reg.has(kind, cls.name) and not reg.has("scorer", cls.name)
    (name, error), = reg.failed
    assert name == mod.__name__ and f"plugin {mod.__name__!r}" in error and message in error, error


def test_a_scorer_under_the_scorer_hook_is_accepted_and_two_defaults_are_refused():
    reg = load_registry(plugins=[plugin("bdframe_register_scorers", GoodScorer),
                                 plugin("bdframe_register_attacks", FirstDefault, SecondDefault)], autoload=False)
    assert reg.has("scorer", "good-scorer") and reg.default("attack") == "first-default"
    assert not reg.has("attack", "second-default")
    assert any("claims to be the default attack" in e for _, e in reg.failed)


# -- one path from recipe to run -----------------------------------------------------------------

def test_run_scan_and_poison_build_the_same_poisoned_set(tmp_path):
    from torchvision.io import decode_png, read_file

    from bdframe.build import materialise
    from bdframe.scan import load_run

    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    recipe, registry = load_recipe(f)
    direct = materialise(recipe, registry)
    assert main(["run", str(f), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "poison.json").read_text())
    assert saved["poison_ids"] == sorted(direct.poison_ids.tolist()) and saved["seed"] == direct.attack_seed
    scanned, _ = load_run(run_dir, device="cpu")
    assert main(["poison", str(f), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "manifest.csv")))
    train_rows = {int(r["id"]): r for r in rows if r["split"] == "train"}
    assert {i for i, r in train_rows.items() if r["poisoned"] == "1"} == set(saved["poison_ids"])
    for parts in (scanned,):
        assert torch.equal(parts.poisoned.images, direct.poisoned.images)
        assert torch.equal(parts.poisoned.labels, direct.poisoned.labels)
    for pos in range(0, len(direct.poisoned), 37):
        i = int(direct.poisoned.ids[pos])
        img = decode_png(read_file(str(tmp_path / "p" / train_rows[i]["file"])))
        assert torch.equal(img, direct.poisoned.images[pos]) and int(train_rows[i]["given_label"]) == \
            int(direct.poisoned.labels[pos])


# -- the defense context -------------------------------------------------------------------------

def protocol_members() -> set[str]:
    names = set(DefenseContext.__annotations__)
    names |= {n for n, v in vars(DefenseContext).items() if callable(v) and not n.startswith("_")}
    return names


def test_the_documented_context_is_the_protocol():
    text = (REPO / "docs" / "plugin-hooks.md").read_text()
    table = text.split("<!-- context-members:", 1)[1].split("\n\n", 1)[0]
    documented = {re.match(r"\| `(\w+)", line).group(1) for line in table.splitlines() if line.startswith("| `")}
    assert documented == protocol_members()


def make_context(tmp_path):
    from bdframe.build import materialise
    from bdframe.runner import RunContext

    f = tmp_path / "r.toml"
    f.write_text(TINY.format(out=tmp_path / "runs", epochs=1))
    recipe, registry = load_recipe(f)
    return RunContext.for_parts(materialise(recipe, registry), torch.device("cpu"), tmp_path, progress=False)


def test_the_run_context_implements_the_protocol_and_nothing_more(tmp_path):
    ctx = make_context(tmp_path)
    assert isinstance(ctx, DefenseContext)
    public = {n for n in dir(ctx) if not n.startswith("_")} - {"history", "for_parts"}
    assert public == protocol_members()


def test_stage_and_checkpoint_names_are_used_once(tmp_path):
    ctx = make_context(tmp_path)
    ctx.stage("warmup")
    with pytest.raises(ValueError, match="stage name 'warmup' is already used"):
        ctx.stage("warmup")
    ctx.checkpoint("warmup")  # stages and checkpoints are separate namespaces
    with pytest.raises(ValueError, match="checkpoint name 'warmup' is already used"):
        ctx.checkpoint("warmup")


def test_a_checkpoint_persists_its_result_and_replays_its_history(tmp_path):
    ctx = make_context(tmp_path)
    ctx.log({"stage": "before"})
    step = ctx.checkpoint("step")
    assert isinstance(step, Checkpoint) and step.load() is None
    st = ctx.stage("inner")
    st_file = tmp_path / "state" / "inner.pt"
    st_file.parent.mkdir(parents=True, exist_ok=True)
    st_file.write_bytes(b"per-epoch state")
    ctx.log({"stage": "inner", "epoch": 1})
    step.save({"answer": 42})
    assert not st_file.exists()  # the finished step's per-epoch state is dropped
    again = make_context(tmp_path)
    assert again.checkpoint("step").load() == {"answer": 42}
    assert again.history == [{"stage": "inner", "epoch": 1, "replayed": True}]
    assert st.name == "inner"


def test_new_model_options_and_the_recipes_own_components(tmp_path):
    ctx = make_context(tmp_path)
    a = ctx.new_model()
    b = ctx.new_model(state_dict=a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.rand(2, 3, 16, 16)
    assert ctx.new_model(num_classes=3)(x).shape == (2, 3) and a(x).shape == (2, 10)
    trainer = ctx.component("trainer")
    assert trainer.name == "standard" and trainer.config.epochs == 1 and trainer.config.batch_size == 64
    assert ctx.component("trainer", epochs=4).config.epochs == 4
    with pytest.raises(ValueError, match="names no attack"):
        ctx.component("attack")
