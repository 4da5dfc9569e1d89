"""The fast-training pieces: data-dependent initialisation (the whitening layer), per-module
learning-rate multipliers, bfloat16 autocast on the CPU."""

import pytest
import torch

from bdframe.data import DatasetInfo, ImageSet
from bdframe.errors import RecipeError
from bdframe.interfaces import StageContext
from bdframe.nn import Classifier
from bdframe.plugins import load_registry
from bdframe.training import OptimSettings, amp_dtype, cpu_bf16_supported, init_from_data, param_groups, run_epochs

REG = load_registry()
INFO = DatasetInfo(10, 3, 32, 32, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


def _images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated channels and neighbouring pixels, as in natural images
    base = torch.rand(n, 1, 16, 16, generator=g)
    x = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    x = torch.cat([x, 0.8 * x + 0.2 * torch.rand(n, 1, 32, 32, generator=g), 1 - x], 1)
    return ImageSet((x * 255).round().to(torch.uint8), torch.arange(n) % 10, torch.arange(n))


def _ce(model, b):
    logits = model(b.x)
    return torch.nn.functional.cross_entropy(logits.float(), b.y), logits


def _fast(**params):
    net = REG.create("model", "fast-cnn", widths=[8, 16, 16], **params).build(INFO)
    return Classifier(net, INFO.mean, INFO.std)


def test_whitening_is_computed_from_data_not_from_the_seed():
    data = _images()
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _fast()
        assert not bool(model.net.stem.initialised)
        assert init_from_data(model, data, torch.device("cpu")) == ["net.stem"]
        assert bool(model.net.stem.initialised)
        weights.append(model.net.stem.conv.weight.clone())
    assert torch.equal(weights[0], weights[1])
    # a second call leaves an initialised layer alone
    model.net.stem.conv.weight.mul_(2)
    assert init_from_data(model, _images(seed=5), torch.device("cpu")) == []
    assert torch.equal(model.net.stem.conv.weight, 2 * weights[1])


def test_whitening_decorrelates_the_patches_it_was_computed_from():
    data = _images(128)
    model = _fast()
    init_from_data(model, data, torch.device("cpu"))
    stem = model.net.stem
    x = model.normalize(data.images.float() / 255)
    out = torch.nn.functional.conv2d(x.double(), stem.conv.weight.double())[:, :12]  # the positive half
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    # unit variance on every component (up to the eps added to small eigenvalues), no correlation
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-6
    big = torch.diag(cov) > 0.5
    assert big.sum() >= 6 and torch.allclose(torch.diag(cov)[big], torch.ones(int(big.sum()), dtype=cov.dtype),
                                             atol=0.05)
    # the second half of the filters is the negation of the first
    assert torch.equal(stem.conv.weight[12:], -stem.conv.weight[:12])
    assert not stem.conv.weight.requires_grad and stem.conv.bias.requires_grad


def test_init_stops_the_forward_pass_at_the_layer():
    model = _fast()
    calls = []
    model.net.groups.register_forward_hook(lambda *a: calls.append(1))
    init_from_data(model, _images(), torch.device("cpu"))
    assert calls == [] and model.training


def test_training_initialises_once_and_a_resumed_stage_keeps_the_saved_filters(tmp_path):
    data = _images(64)
    s = OptimSettings(epochs=1, batch_size=32, lr=0.01)
    state = tmp_path / "state.pt"
    model = _fast()
    run_epochs(model, data, StageContext(name="t", seed=0, device="cpu", state_path=str(state), progress=False),
               s, _ce)
    assert bool(model.net.stem.initialised)
    saved = torch.load(state, weights_only=False)["model"]["net.stem.conv.weight"]
    assert torch.equal(saved, model.net.stem.conv.weight)
    # a new model resuming from the state gets the saved filters, not ones from other data
    fresh = _fast()
    run_epochs(fresh, _images(64, seed=9), StageContext(name="t", seed=0, device="cpu", state_path=str(state),
                                                        progress=False),
               s, _ce)
    assert torch.equal(fresh.net.stem.conv.weight, saved)


def test_param_groups_scale_lr_and_keep_the_per_step_decay():
    model = _fast()
    s = OptimSettings(lr=0.2, weight_decay=1e-3)
    groups = param_groups(model, s)
    by_scale = {g["lr_scale"]: g for g in groups}
    assert set(by_scale) == {1.0, 64.0}
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in by_scale[64.0]["params"]} == bn_biases
    assert by_scale[64.0]["weight_decay"] * 64.0 == pytest.approx(s.weight_decay)
    # frozen parameters (the whitening filters, BN scales) are in no group
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert id(model.net.stem.conv.weight) not in trainable
    # the model option sets the multiplier
    assert {g["lr_scale"] for g in param_groups(_fast(bn_lr_scale=8.0), s)} == {1.0, 8.0}


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adaptive_optimizers_train_every_parameter_at_the_stage_lr(optimizer):
    model = _fast()
    s = OptimSettings(optimizer=optimizer, lr=0.002, weight_decay=1e-3)
    groups = param_groups(model, s)
    assert [g["lr_scale"] for g in groups] == [1.0]
    assert groups[0]["weight_decay"] == pytest.approx(s.weight_decay)
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("widths", [[8, 16], [8, 16, 2000], [8, 16, True]])
def test_fast_cnn_widths_are_validated(widths):
    with pytest.raises(RecipeError, match="widths"):
        REG.create("model", "fast-cnn", widths=widths)


def test_amp_settings_choose_the_cpu_dtype():
    cpu = torch.device("cpu")
    assert amp_dtype(OptimSettings(amp="auto"), cpu) is None
    assert amp_dtype(OptimSettings(amp="off"), cpu) is None
    assert amp_dtype(OptimSettings(amp="on"), cpu) is torch.bfloat16


@pytest.mark.skipif(not cpu_bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX); "
                                                     "emulated bfloat16 is too slow to be an option here")
def test_bfloat16_training_on_the_cpu_tracks_float32():
    data = _images(64)
    losses = {}
    for amp in ("off", "on"):
        torch.manual_seed(0)
        model = _fast()
        hist = run_epochs(model, data, StageContext(name="t", seed=0, device="cpu", progress=False),
                          OptimSettings(epochs=2, batch_size=32, lr=0.01, amp=amp),
                          _ce)
        losses[amp] = [h["loss"] for h in hist]
    assert losses["on"] == pytest.approx(losses["off"], rel=0.05)


def _train(model, data, **settings):
    s = OptimSettings(**{"epochs": 1, "batch_size": len(data), "lr": 0.05, "crop_padding": 0, "flip": False,
                         **settings})
    run_epochs(model, data, StageContext(name="t", seed=0, device="cpu", progress=False), s, _ce)
    return {n: t.clone() for n, t in model.state_dict().items() if t.is_floating_point()}


def test_lookahead_with_alpha_one_is_plain_training_and_one_step_ends_halfway():
    import copy

    data = _images(32)
    torch.manual_seed(0)
    start = _fast()
    init_from_data(start, data, torch.device("cpu"))
    w0 = {n: t.clone() for n, t in start.state_dict().items() if t.is_floating_point()}
    plain = _train(copy.deepcopy(start), data)
    assert any(not torch.equal(plain[n], w0[n]) for n in w0)
    same = _train(copy.deepcopy(start), data, lookahead=1.0, lookahead_steps=1)
    for n in plain:
        assert torch.allclose(same[n], plain[n], atol=1e-6), n
    # one step with k = 1 and alpha = 0.5: the slow weights (the result) end halfway
    half = _train(copy.deepcopy(start), data, lookahead=0.5, lookahead_steps=1)
    for n in plain:
        assert torch.allclose(half[n], (w0[n] + plain[n]) / 2, atol=1e-6), n


def test_emulated_bfloat16_warning_names_every_setting_that_asks_for_it(monkeypatch):
    import bdframe.training

    from bdframe.training import emulated_bf16_warning

    cpu = torch.device("cpu")
    amps = {"[train] amp": "on", "[defense] amp": "auto", "[model] amp": "on"}
    monkeypatch.setattr(bdframe.training, "cpu_bf16_supported", lambda: False)
    w = emulated_bf16_warning(amps, cpu)
    assert w.startswith('warning: [train] amp, [model] amp = "on"') and "emulated" in w
    assert emulated_bf16_warning({"[train] amp": "auto", "[defense] amp": "off"}, cpu) is None
    assert emulated_bf16_warning(amps, torch.device("meta")) is None  # not the CPU: not this warning
    monkeypatch.setattr(bdframe.training, "cpu_bf16_supported", lambda: True)
    assert emulated_bf16_warning(amps, cpu) is None


def test_a_stage_stops_where_its_rule_says_and_a_resumed_stopped_stage_trains_no_further(tmp_path):
    """``stop`` sees each epoch's record (and may add to it); the epoch where it holds is the
    last, marked ``stopped``; resuming from the saved state neither trains nor asks again."""
    data = _images(64)
    s = OptimSettings(epochs=5, batch_size=32, lr=0.01)
    state = tmp_path / "state.pt"
    seen = []

    def stop(rec):
        seen.append(rec["epoch"])
        rec["asked"] = True
        return rec["epoch"] == 2

    model = _fast()
    hist = run_epochs(model, data, StageContext(name="t", seed=0, device="cpu", state_path=str(state),
                                                progress=False), s, _ce, stop=stop)
    assert seen == [1, 2] and [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["stopped"] is True and "stopped" not in hist[0] and all(h["asked"] for h in hist)
    after = {n: t.clone() for n, t in model.state_dict().items()}
    fresh = _fast()
    replayed = []
    again = run_epochs(fresh, data, StageContext(name="t", seed=0, device="cpu", state_path=str(state),
                                                 progress=False, on_epoch=replayed.append), s, _ce, stop=stop)
    assert seen == [1, 2] and again == hist and [r["epoch"] for r in replayed] == [1, 2]
    assert all(torch.equal(t, after[n]) for n, t in fresh.state_dict().items())
    # without a rule (or one that never holds) every epoch runs
    assert len(run_epochs(_fast(), data, StageContext(name="t", seed=0, device="cpu", progress=False),
                          s, _ce, stop=lambda rec: False)) == 5
