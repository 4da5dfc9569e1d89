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


# the CPUs the figures of the README quickstart and of the docs' synthetic examples were recorded on:
# vendor id and the instruction set torch's CPU kernels used there (torch.backends.cpu.get_cpu_capability()).
# the README quickstart was re-recorded on an AMD EPYC whose kernels use AVX512; the docs' synthetic
# examples (SCAnFT, CLP) were recorded on an AMD EPYC with AVX2 only. A different instruction set
# changes the order of floating-point sums, which on these tiny datasets changes the figures.
README_CPU = ("AuthenticAMD", "AVX512")
EXAMPLES_CPU = ("AuthenticAMD", "AVX2")


def cpu_signature():
    """(vendor id, torch's CPU capability), e.g. ("AuthenticAMD", "AVX512")."""
    import torch

    return cpu_vendor(), torch.backends.cpu.get_cpu_capability()


def cpu_vendor():
    """The CPU's vendor id from /proc/cpuinfo (e.g. AuthenticAMD, GenuineIntel), None if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def spy_on_trainers(ctx, record):
    """Every training stage the defense takes from ``ctx`` calls ``record(stage, data, keyword
    inputs)`` before it trains."""
    real = ctx.component

    def component(kind, name=None, **params):
        made = real(kind, name, **params)
        if kind == "trainer":
            fit = made.fit

            def spy(model, data, st, made=made, fit=fit, **kw):
                record(made, data, kw)
                return fit(model, data, st, **kw)

            made.fit = spy
        return made

    ctx.component = component
