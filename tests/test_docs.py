"""The documentation stays true to the code: the generated recipe reference is current, the
recipes shown in docs/ validate, and the links between documents resolve."""

import importlib.util
import re
from pathlib import Path

import pytest

from bdframe import recipe as rmod
from bdframe.plugins import load_registry

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def _gen_reference():
    spec = importlib.util.spec_from_file_location("bdframe_docs_gen_reference", DOCS / "gen_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_reference_is_current():
    gen = _gen_reference()
    committed = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    assert gen.render() == committed, (
        "docs/recipe-reference.md is out of date with the component Configs; "
        "run `python docs/gen_reference.py` and commit the result")


def test_reference_ignores_plugin_environment_variables(monkeypatch):
    gen = _gen_reference()
    expected = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    monkeypatch.setenv("BDFRAME_BLOCK_PLUGINS", "bdframe-attack-badnet")
    monkeypatch.setenv("BDFRAME_LOAD_PLUGINS", "bdframe-dataset-synthetic")
    assert gen.render() == expected
    import os

    assert os.environ["BDFRAME_BLOCK_PLUGINS"] == "bdframe-attack-badnet"  # restored afterwards


def test_reference_lists_every_builtin_component():
    text = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    gen = _gen_reference()
    registry = gen.builtin_registry()
    for e in registry.entries():
        assert f"### `{e.name}`" in text and f"`{e.provider.distribution}`" in text, (e.kind, e.name)


def _toml_blocks(path: Path):
    return re.findall(r"```toml\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


DOC_FILES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_complete_recipes_in_docs_validate(path):
    """Every ```toml block with both a [dataset] and a [model] table is a whole recipe and must
    validate (dataset roots and files are not checked: they are the reader's)."""
    registry = load_registry()
    for block in _toml_blocks(path):
        if "[dataset]" not in block or "[model]" not in block or "corner-noise" in block:
            continue  # fragments; the third-party example is validated in test_third_party_example
        rmod.loads_dict(rmod.tomllib.loads(block), registry=registry, source=f"{path.name} block",
                        check_dataset=False)


LINKED_FILES = DOC_FILES + sorted(REPO.glob("plugins/*/*/README.md")) + [REPO / "examples/third-party-attack/README.md"]


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


def test_code_copied_from_the_example_is_current():
    """Blocks in docs/ preceded by ``<!-- from PATH -->`` are verbatim excerpts of PATH."""
    found = 0
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for source, block in re.findall(r"<!-- from (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S):
            found += 1
            assert block in (REPO / source).read_text(encoding="utf-8"), (
                f"{path.name}: the excerpt of {source} no longer matches it:\n{block}")
    assert found
