"""The SampleScorer contract (docs/scorers.md) for every registered scorer,
through bdframe.testing.check_scorer_contract (which third-party scorer plugins can call too)."""

import pytest
import torch

from bdframe.plugins import load_registry
from bdframe.testing import check_scorer_contract, score_ctx, tiny_classifier
from scorers.scorer_helpers import make

SCORERS = load_registry().names("scorer")
EXPECTED = {"adv-kl", "fct", "loss", "sce", "scale-up", "spectral", "activation-clustering", "strip", "scan"}
SET_LEVEL = {"spectral", "activation-clustering", "scan"}


def test_all_scorers_registered(registry):
    assert EXPECTED <= set(SCORERS)
    for name in EXPECTED:
        e = registry.entry("scorer", name)
        assert e.provider.distribution == f"bdframe-scorer-{name}"
        assert e.cls.set_level == (name in SET_LEVEL)


@pytest.mark.parametrize("name", SCORERS)
def test_contract(name, registry, tiny_scorer_data, tiny_scorer_model):
    scorer = registry.create("scorer", name)
    check_scorer_contract(scorer, tiny_scorer_model, tiny_scorer_data)


@pytest.mark.parametrize("name", SCORERS)
def test_contract_model_in_train_mode_and_ids_not_positions(name, registry):
    """A model handed over in train mode is scored in eval mode and handed back in train mode;
    scores follow ids (other id offsets, 16x16 images, 3 classes)."""
    data, _ = make(25, k=3, size=16, id_offset=7_000_000_000)
    model = tiny_classifier(data, seed=3).train()
    check_scorer_contract(registry.create("scorer", name), model, data, seed=5, batch_sizes=(7,))


@pytest.mark.parametrize("name", SCORERS)
def test_constant_model_scores_depend_on_the_label_at_most(name, registry):
    data, model = make(24, constant=True)
    s = registry.create("scorer", name).score(model, data, score_ctx(0))
    for c in range(4):
        sel = s[data.labels == c]
        assert torch.allclose(sel, sel[0].expand_as(sel), atol=1e-6), f"{name}: class {c}: {sel}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SCORERS)
def test_cuda_matches_cpu(name, registry):
    """Per-id randomness is integer hashing, so devices draw the same masks/transforms/pools."""
    data, model = make(40)
    scorer = registry.create("scorer", name)
    cpu = scorer.score(model, data, score_ctx(0, 16, "cpu")).double()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 like the CPU
    try:
        gpu = scorer.score(model.to("cuda"), data, score_ctx(0, 16, "cuda")).double().cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert gpu.shape == cpu.shape and bool(torch.isfinite(gpu).all())
    assert torch.allclose(gpu, cpu, atol=1e-3, rtol=1e-3), (gpu - cpu).abs().max()
