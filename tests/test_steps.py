"""bdframe.steps: a finished step is loaded, not redone; its model and figures come back."""

import torch

from bdframe import steps


class FakeCheckpoint:
    def __init__(self, store, name):
        self.store, self.name = store, name

    def load(self):
        return self.store.get(self.name)

    def save(self, result):
        self.store[self.name] = result


class FakeContext:
    def __init__(self):
        self.store, self.logged = {}, []

    def checkpoint(self, name):
        return FakeCheckpoint(self.store, name)

    def evaluate(self, model):
        return {"clean_acc": float(model.weight.detach().sum()), "asr": None}

    def log(self, record):
        self.logged.append(record)


def test_a_finished_step_is_loaded_instead_of_redone():
    ctx = FakeContext()
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    calls = []

    def work():
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.25)
        return {"note": "done"}

    first = steps.run(ctx, "s", model, work)
    assert calls == [1] and first["eval"]["clean_acc"] == 0.5 and first["note"] == "done"
    assert ctx.logged == [{"stage": "s", "clean_acc": 0.5, "asr": None}]
    fresh = torch.nn.Linear(2, 1, bias=False)
    again = steps.run(ctx, "s", fresh, work)
    assert calls == [1] and torch.equal(fresh.weight, model.weight) and again["note"] == "done"
    assert steps.figures({"clean_acc": 0.5, "asr": None}) == "ACC 50.00%"
    assert steps.figures({"clean_acc": 0.5, "asr": 0.0123}) == "ACC 50.00%, ASR 1.23%"
