"""The component registry: components by kind and name, with provenance.

Built from a plugin manager by :func:`bdframe.plugins.load_registry`. Each hook
implementation is called on its own with a :class:`Registrar` bound to the plugin that
provides it, so every component records the distribution and version it came from.
"""

from __future__ import annotations

import difflib
from typing import Iterable

import attrs

from bdframe.errors import UserError
from bdframe.interfaces import KIND, KINDS, Component


@attrs.frozen
class Provider:
    plugin: str  # plugin name in the plugin manager (entry-point name for installed plugins)
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.distribution:
            return f"{self.distribution} {self.version or ''}".strip()
        return f"plugin {self.plugin!r}"


@attrs.frozen
class Entry:
    kind: str
    name: str
    cls: type
    provider: Provider


class DuplicateComponentError(UserError):
    pass


class UnknownComponentError(UserError):
    pass


class RegistrationError(Exception):
    """A plugin registered a component that breaks the contract; the component is refused and
    the plugin listed in ``Registry.failed`` with this message."""


def contract_problem(kind: str, cls) -> str | None:
    """Why ``cls`` cannot be registered as a ``kind`` component (None if it can)."""
    spec = KIND[kind]
    what = getattr(cls, "__qualname__", repr(cls))
    if not isinstance(cls, type) or not issubclass(cls, spec.interface):
        return (f"{what} is registered by {spec.hook} but is not a {spec.interface.__name__} "
                f"(subclass bdframe.interfaces.{spec.interface.__name__})")
    if cls.kind != kind:
        return f"{what} is a {cls.kind!r} component but is registered by {spec.hook}, the hook for {kind!r}"
    if not getattr(cls, "name", ""):
        return f"{what} has no component name (set the class attribute name)"
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and attrs.has(config)):
        return f"{what}.Config must be a frozen attrs class (@attrs.frozen)"
    try:
        inst = config()
    except Exception as e:
        return f"{what}.Config() fails ({type(e).__name__}: {e}): give every field a default"
    try:
        setattr(inst, "_bdframe_frozen_probe", 1)
    except attrs.exceptions.FrozenInstanceError:
        return None
    except AttributeError:
        pass
    return f"{what}.Config must be frozen (@attrs.frozen), so a component's parameters cannot change"


class Registry:
    def __init__(self):
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.failed: list[tuple[str, str]] = []  # (plugin, error) that failed to load

    def _add(self, kind: str, cls: type, provider: Provider) -> None:
        if kind not in self._entries:
            raise ValueError(f"unknown component kind {kind!r}")
        problem = contract_problem(kind, cls)
        if problem:
            raise RegistrationError(f"{provider.describe()}: {problem}")
        name = cls.name
        if cls.default:
            other = self.default(kind)
            if other is not None and self.get(kind, other) is not cls:
                raise RegistrationError(f"{provider.describe()}: {cls.__qualname__} claims to be the default "
                                        f"{kind}, but {other!r} already is")
        existing = self._entries[kind].get(name)
        if existing is not None and existing.cls is not cls:
            raise DuplicateComponentError(
                f"{kind} {name!r} is registered twice: by {existing.provider.describe()} "
                f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by {provider.describe()} "
                f"({cls.__module__}.{cls.__qualname__}); block one of them (BDFRAME_BLOCK_PLUGINS or "
                f"[plugins] block in the recipe)")
        self._entries[kind][name] = Entry(kind, name, cls, provider)

    def default(self, kind: str) -> str | None:
        """The name of the installed component that a recipe without this kind's section gets."""
        return next((n for n, e in sorted(self._entries[kind].items()) if e.cls.default), None)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterable[Entry]:
        kinds = [kind] if kind else KINDS
        for k in kinds:
            for name in sorted(self._entries[k]):
                yield self._entries[k][name]

    def entry(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def get(self, kind: str, name: str) -> type:
        return self.entry(kind, name).cls

    def has(self, kind: str, name: str) -> bool:
        return name in self._entries[kind]

    def unknown_message(self, kind: str, name: str) -> str:
        known = self.names(kind)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}"
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        msg += f" Available: {', '.join(known) if known else '(none installed)'}"
        return msg

    def create(self, kind: str, name: str, **params) -> Component:
        """Instantiate a component with params checked against its Config."""
        from bdframe.recipe import structure_config

        cls = self.get(kind, name)
        config = structure_config(cls, params, path=f"{kind}:{name}")
        return cls(config)


class Registrar:
    """The object a ``bdframe_register_*`` hook receives."""

    def __init__(self, registry: Registry, kind: str, provider: Provider):
        self._registry = registry
        self._kind = kind
        self.provider = provider

    def add(self, cls: type) -> type:
        self._registry._add(self._kind, cls, self.provider)
        return cls
