"""Run directories: atomic writes, an in-progress ``.partial`` directory, resume.

A run is written into ``<out>.partial`` and renamed to ``<out>`` only when it completes, so
an interrupted or failed run never looks finished. ``--resume`` continues a ``.partial``
directory whose resolved recipe matches.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bdframe.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class RunDir:
    """``RunDir(final, resume=False, overwrite=False)``; use :attr:`path` while running and
    :meth:`finish` at the end."""

    def __init__(self, final: Path, *, resume: bool = False, overwrite: bool = False, recipe_toml: str):
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        if self.final.exists() and not overwrite:
            raise UserError(f"run directory {str(self.final)!r} already exists; pass --overwrite to replace it "
                            f"or --out to choose another directory")
        if resume:
            if not self.path.exists():
                raise UserError(f"nothing to resume: {str(self.path)!r} does not exist")
            saved = self.path / "recipe.toml"
            if not saved.exists() or saved.read_text(encoding="utf-8") != recipe_toml:
                raise UserError(f"cannot resume {str(self.path)!r}: its recipe differs from this one "
                                f"(run without --resume and with --overwrite to start over)")
        elif self.path.exists():
            if overwrite:
                shutil.rmtree(self.path)
            else:
                raise UserError(f"an interrupted run exists at {str(self.path)!r}; pass --resume to continue it "
                                f"or --overwrite to start over")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "recipe.toml", recipe_toml)

    def file(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self) -> Path:
        state = self.path / "state"
        if state.exists():
            shutil.rmtree(state)
        if self.final.exists() and self.overwrite:
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final
