"""Run directories: atomic writes, an in-progress ``.partial`` directory, resume.

A run is written into ``<out>.partial`` and renamed to ``<out>`` only when it completes, so
an interrupted or failed run never looks finished. ``--resume`` continues a ``.partial``
directory whose resolved recipe matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

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


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a reader never sees half a file."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def output_problem(path: Path, field: str) -> Optional[str]:
    """Why a directory cannot be created (or written) at ``path``, or None.

    Checked before anything is written: ``path`` must be a directory or not exist yet, and its
    nearest existing ancestor must be a writable directory (not a file).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{field}: {str(path)!r} exists and is not a directory"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{field}: cannot create {str(path)!r}: {str(probe)!r} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{field}: cannot create {str(path)!r}: {str(probe)!r} is not writable"
    return None


def recipe_digest(recipe_toml: str) -> str:
    return hashlib.sha256(recipe_toml.encode("utf-8")).hexdigest()


class RunDir:
    """``RunDir(final, resume=False, overwrite=False, recipe_toml=...)``; use :attr:`path` while
    running and :meth:`finish` at the end.

    While the run is in progress the directory holds only a digest of the resolved recipe
    (``resume.json``), so a defense reading the directory cannot learn the recipe's
    ``[attack]`` section; ``recipe.toml`` is written by :meth:`finish`.
    """

    def __init__(self, final: Path, *, resume: bool = False, overwrite: bool = False, recipe_toml: str,
                 field: str = "$.output_dir"):
        self.final = Path(final)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        self.recipe_toml = recipe_toml
        for p in (self.final, self.path):
            problem = output_problem(p, field)
            if problem:
                raise UserError(problem)
        if self.final.exists() and not overwrite:
            raise UserError(f"run directory {str(self.final)!r} already exists; pass --overwrite to replace it "
                            f"or --out to choose another directory")
        digest = recipe_digest(recipe_toml)
        if resume:
            if not self.path.exists():
                raise UserError(f"nothing to resume: {str(self.path)!r} does not exist")
            try:
                saved = read_json(self.path / "resume.json").get("recipe_sha256")
            except (OSError, ValueError, AttributeError):
                saved = None
            if saved != digest:
                raise UserError(f"cannot resume {str(self.path)!r}: its recipe differs from this one "
                                f"(run without --resume and with --overwrite to start over)")
        elif self.path.exists():
            if overwrite:
                shutil.rmtree(self.path)
            else:
                raise UserError(f"an interrupted run exists at {str(self.path)!r}; pass --resume to continue it "
                                f"or --overwrite to start over")
        # the directories this run creates, outermost first, so a refused run can remove them again
        self.created: list[Path] = []
        probe = self.path.parent
        while not probe.exists():
            self.created.insert(0, probe)
            probe = probe.parent
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / "resume.json", {"recipe_sha256": digest})

    def file(self, name: str) -> Path:
        return self.path / name

    def discard(self) -> None:
        """Remove the in-progress directory and every (then empty) parent this run created."""
        shutil.rmtree(self.path, ignore_errors=True)
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break

    def finish(self) -> Path:
        state = self.path / "state"
        if state.exists():
            shutil.rmtree(state)
        write_text_atomic(self.path / "recipe.toml", self.recipe_toml)
        (self.path / "resume.json").unlink(missing_ok=True)
        if self.final.exists() and self.overwrite:
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final
