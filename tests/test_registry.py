"""Plugin discovery, blocking, provenance, duplicate and unknown names."""

import sys
import textwrap

import pytest

from bdframe.errors import UserError
from bdframe.plugins import load_registry
from bdframe.testing import registry_with

BUILTIN = {"dataset": {"synthetic", "cifar10", "cifar100", "imagefolder"},
           "model": {"simple-cnn", "resnet18", "resnet34", "preact-resnet18", "mobilenetv2"},
           "attack": {"badnet"}, "trainer": {"standard"}, "defense": {"none"}}


def test_builtin_plugins_are_discovered_with_provenance():
    reg = load_registry()
    for kind, names in BUILTIN.items():
        assert names <= set(reg.names(kind)), kind
    e = reg.entry("attack", "badnet")
    assert e.provider.distribution == "bdframe-attack-badnet"
    assert e.provider.plugin == "bdframe-attack-badnet"
    assert e.provider.version
    assert reg.failed == []


@pytest.fixture
def throwaway_dist(tmp_path, monkeypatch):
    """An extra installed distribution (a .dist-info with an entry point) on sys.path."""
    (tmp_path / "throwaway_bd_plugin.py").write_text(textwrap.dedent('''
        import attrs
        from bdframe import hookimpl
        from bdframe.interfaces import Attack

        class Nop(Attack):
            name = "nop-attack"

        @hookimpl
        def bdframe_register_attacks(registry):
            registry.add(Nop)
    '''))
    info = tmp_path / "bdframe_throwaway-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bdframe-throwaway\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[bdframe]\nbdframe-throwaway = throwaway_bd_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("throwaway_bd_plugin", None)


def test_third_party_distribution_is_found_and_blockable(throwaway_dist, monkeypatch):
    reg = load_registry()
    e = reg.entry("attack", "nop-attack")
    assert (e.provider.distribution, e.provider.version) == ("bdframe-throwaway", "0.3")
    assert "nop-attack" not in load_registry(block=["bdframe-throwaway"]).names("attack")
    monkeypatch.setenv("BDFRAME_BLOCK_PLUGINS", "bdframe-throwaway, bdframe-attack-badnet")
    reg = load_registry()
    assert "nop-attack" not in reg.names("attack") and "badnet" not in reg.names("attack")
    assert "synthetic" in reg.names("dataset")


def test_load_plugins_env_restricts_autoload(monkeypatch):
    monkeypatch.setenv("BDFRAME_LOAD_PLUGINS", "bdframe-attack-badnet")
    reg = load_registry()
    assert reg.names("attack") == ["badnet"] and reg.names("dataset") == []


def test_duplicate_name_names_both_providers():
    import types

    from bdframe import hookimpl
    from bdframe.interfaces import Attack

    class Other(Attack):
        name = "badnet"

    mod = types.ModuleType("my_dup_plugin")
    mod.bdframe_register_attacks = hookimpl(lambda registry: registry.add(Other))
    with pytest.raises(UserError) as ei:
        registry_with(mod)
    msg = str(ei.value)
    assert "bdframe-attack-badnet" in msg and "my_dup_plugin" in msg and "'badnet'" in msg


def test_unknown_name_lists_available_and_closest():
    reg = load_registry()
    with pytest.raises(UserError) as ei:
        reg.get("attack", "badnett")
    assert "did you mean 'badnet'" in str(ei.value) and "Available:" in str(ei.value)


def test_broken_plugin_is_reported_not_fatal():
    import types

    from bdframe import hookimpl

    def boom(registry):
        raise RuntimeError("kaboom")

    mod = types.ModuleType("broken_plugin")
    mod.bdframe_register_models = hookimpl(boom)
    reg = registry_with(mod)
    assert ("broken_plugin", "RuntimeError: kaboom") in reg.failed
    assert "simple-cnn" in reg.names("model")


def test_misspelt_hook_fails_loudly():
    import types

    from bdframe import hookimpl

    mod = types.ModuleType("typo_plugin")
    mod.bdframe_register_atacks = hookimpl(lambda registry: None)
    with pytest.raises(UserError, match="unknown hook"):
        registry_with(mod, autoload=False)
