"""Plugin discovery: a fresh pluggy manager per call, nothing discovered at import time.

Installed plugins are found through entry points in the group ``bdframe``; the entry-point
name is the distribution name (``bdframe-attack-badnet``), so listing and blocking use one
name. Environment variables:

- ``BDFRAME_BLOCK_PLUGINS``: comma-separated plugin names not to load.
- ``BDFRAME_LOAD_PLUGINS``: if set, load only these entry points (comma-separated; empty
  means none), like ``LLM_LOAD_PLUGINS``.

A recipe adds its own ``[plugins] block = [...]`` and ``modules = [...]`` (importable modules
registered as plugins for this recipe only).
"""

from __future__ import annotations

import importlib
import os
import traceback
from importlib.metadata import entry_points
from typing import Iterable

import pluggy

from bdframe import hookspecs
from bdframe.errors import UserError
from bdframe.interfaces import KIND_TABLE
from bdframe.registry import Provider, Registrar, RegistrationError, Registry

GROUP = "bdframe"


def _env_list(var: str) -> list[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return [p.strip() for p in raw.split(",") if p.strip()]


def make_plugin_manager(*, block: Iterable[str] = (), modules: Iterable[str] = (),
                        plugins: Iterable[object] = (), autoload: bool = True):
    """Build a fresh manager. Returns ``(pm, provenance, failures)``.

    ``plugins`` are module/objects registered directly (tests use this); ``modules`` are
    imported by name. ``failures`` lists ``(plugin name, error)`` for plugins that did not load.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    provenance: dict[str, Provider] = {}
    failures: list[tuple[str, str]] = []
    blocked = set(block) | set(_env_list("BDFRAME_BLOCK_PLUGINS") or [])
    for name in blocked:
        pm.set_blocked(name)
    only = _env_list("BDFRAME_LOAD_PLUGINS")
    if autoload:
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            if only is not None and ep.name not in only:
                continue
            if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin must not take the others down
                failures.append((ep.name, f"{type(e).__name__}: {e}"))
                continue
            provenance[ep.name] = Provider(ep.name, dist.metadata["Name"] if dist else ep.name,
                                           dist.version if dist else None)
    for mod in modules:
        if pm.is_blocked(mod) or pm.has_plugin(mod):
            continue
        try:
            plugin = importlib.import_module(mod)
        except Exception as e:
            raise UserError(f"plugin module {mod!r} could not be imported: {type(e).__name__}: {e}") from None
        pm.register(plugin, name=mod)
        provenance[mod] = Provider(mod)
    for i, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"plugin-{i}"
        if pm.is_blocked(name) or pm.has_plugin(name):
            continue
        pm.register(plugin, name=name)
        provenance[name] = Provider(name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise UserError(f"plugin {e.plugin!r} implements an unknown hook: {e}") from None
    return pm, provenance, failures


def load_registry(*, block: Iterable[str] = (), modules: Iterable[str] = (),
                  plugins: Iterable[object] = (), autoload: bool = True) -> Registry:
    """Discover plugins and return a :class:`Registry` of every component they register."""
    pm, provenance, failures = make_plugin_manager(block=block, modules=modules, plugins=plugins,
                                                   autoload=autoload)
    registry = Registry()
    registry.failed.extend(failures)
    for kind in KIND_TABLE:
        hook = getattr(pm.hook, kind.hook)
        for impl in reversed(hook.get_hookimpls()):  # registration order
            provider = provenance.get(impl.plugin_name, Provider(impl.plugin_name))
            try:
                impl.function(registry=Registrar(registry, kind.name, provider))
            except RegistrationError as e:  # a component that breaks the contract is refused
                registry.failed.append((impl.plugin_name, str(e)))
            except UserError:
                raise
            except Exception as e:
                registry.failed.append((impl.plugin_name, f"{type(e).__name__}: {e}"))
                if os.environ.get("BDFRAME_DEBUG"):
                    traceback.print_exc()
    return registry


def load_recipe(path, overrides: dict | None = None):
    """``(recipe, registry)`` for a recipe file: parse it, apply top-level ``overrides`` (None
    values are ignored), build the registry its ``[plugins]`` section asks for, validate."""
    from pathlib import Path

    from bdframe import recipe as rmod
    from bdframe.errors import RecipeError

    data = rmod.parse_toml(path)
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    settings, problems = rmod.plugin_settings(data)
    if problems:
        raise RecipeError(problems, source=str(path))
    registry = load_registry(block=settings.block, modules=settings.modules)
    recipe = rmod.loads_dict(data, registry, source=str(path), default_name=Path(path).stem)
    return recipe, registry
