"""Shared test helpers (tests/ is on pytest's pythonpath)."""

from pathlib import Path


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY = """
name = "tiny"
seed = 3
device = "cpu"
output_dir = "{out}"

[dataset]
name = "synthetic"
train_size = 300
test_size = 100
image_size = 16

[model]
name = "simple-cnn"
width = 4

[attack]
name = "badnet"
poison_rate = 0.1
target = 1

[train]
name = "standard"
epochs = {epochs}
batch_size = 64
lr = 0.05
"""
