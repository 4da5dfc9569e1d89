"""pluggy hook specifications. Every hook is prefixed ``bdframe_``.

A plugin module implements any of these with ``@bdframe.hookimpl`` and calls
``registry.add(ComponentClass)`` for each component it provides (which hook registers which
kind is ``bdframe.interfaces.KIND_TABLE``)::

    from bdframe import hookimpl

    @hookimpl
    def bdframe_register_attacks(registry):
        registry.add(MyAttack)
"""

import pluggy

PROJECT = "bdframe"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bdframe_register_datasets(registry):
    """Register DatasetFactory classes."""


@hookspec
def bdframe_register_models(registry):
    """Register ModelFactory classes."""


@hookspec
def bdframe_register_attacks(registry):
    """Register Attack classes."""


@hookspec
def bdframe_register_scorers(registry):
    """Register SampleScorer classes."""


@hookspec
def bdframe_register_trainers(registry):
    """Register Trainer (training stage) classes."""


@hookspec
def bdframe_register_defenses(registry):
    """Register Defense classes."""
