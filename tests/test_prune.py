"""Pruning during fine-tuning: the cubic schedule, magnitude vs movement scores, structure, Trainer use."""
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.prune import Pruner, clean_path, cubic_sparsity
from tiny import VOCAB, Stateless, Stop, bert, gpt2, stop_at


def test_cubic_schedule_formula():
    s_f, s_i, total, warm, cool = 0.9, 0.1, 110, 10, 20
    for t in [0, 5, 10, 25, 50, 89, 90, 100, 110, 200]:
        frac = min(max(t - warm, 0), total - warm - cool) / (total - warm - cool)
        assert cubic_sparsity(t, s_f, total, s_i, warm, cool) == pytest.approx(s_f + (s_i - s_f) * (1 - frac) ** 3)
    assert cubic_sparsity(0, 0.9, 100) == 0.0 and cubic_sparsity(100, 0.9, 100) == pytest.approx(0.9)


def _toy(method, steps=20):
    """y = x w*: weights 0-3 start large but their target is 0 (they shrink); weights 4-7 start
    small but their target is 3 (they grow away from zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.1, -0.1, 0.1, -0.1]]))
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, -3.0, 3.0, -3.0]])
    pruner = Pruner(model, method=method, final_sparsity=0.5, total_steps=steps, warmup_steps=steps - 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.002)  # small: the ranking by size does not flip
    for step in range(1, steps + 1):
        x = torch.randn(64, 8)
        loss = (model(x) - x @ target.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner(step=step)
    return model[0].weight.detach()[0], pruner


def test_movement_keeps_weights_moving_away_from_zero_and_magnitude_does_not():
    w_mag, p_mag = _toy("magnitude")
    w_mov, p_mov = _toy("movement")
    growing, shrinking = [4, 5, 6, 7], [0, 1, 2, 3]
    # magnitude keeps the still-large weights that are heading to zero
    assert (w_mag[shrinking] != 0).all() and (w_mag[growing] == 0).all()
    # movement keeps the small weights that are moving away from zero
    assert (w_mov[growing] != 0).all() and (w_mov[shrinking] == 0).all()
    assert p_mag.report()["overall"] == p_mov.report()["overall"] == 0.5


def _full_bert():
    return dt.attach(bert(), dt.FullConfig())


@pytest.mark.parametrize("structure", ["unstructured", "rows", "blocks"])
def test_trainer_callback_reaches_exact_sparsity_per_layer(structure, tmp_path):
    model = _full_bert()
    pruner = Pruner(model, method="movement", final_sparsity=0.75, structure=structure, block=(8, 8))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (6,), generator=g).tolist(), "attention_mask": [1] * 6,
             "labels": i % 2} for i in range(32)]
    cfg = dt.train.TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=8, lr=1e-3, progress=False,
                               save=False, warmup_ratio=0.0)
    dt.train.Trainer(model, cfg, data, collate_fn=dt.data.Collator(0), callbacks=[pruner]).fit()
    report = pruner.report()
    assert report["target"] == pytest.approx(0.75)
    assert set(report["per_layer"]) == {p for p in report["per_layer"] if "classifier" not in p}
    assert "bert.encoder.layer.0.attention.self.query" in report["per_layer"]
    for path, weight in pruner.layers.items():
        assert report["per_layer"][path] == pytest.approx(0.75, abs=1e-9), path
        zero = weight == 0
        if structure == "rows":
            assert torch.equal(zero.all(1), zero.any(1))  # whole rows
        if structure == "blocks":
            blocks = zero.view(weight.shape[0] // 8, 8, weight.shape[1] // 8, 8).permute(0, 2, 1, 3).flatten(2)
            assert torch.equal(blocks.all(-1), blocks.any(-1))  # whole 8x8 blocks
    plain = model.merge_and_unload()  # the pruned model: its weights are exactly zero
    w = plain.bert.encoder.layer[0].attention.self.query.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.75)


def test_gpt2_conv1d_rows_are_output_units():
    model = dt.attach(gpt2(), dt.FullConfig())
    pruner = Pruner(model, method="magnitude", final_sparsity=0.5, structure="rows", targets=["c_fc"])
    pruner.prune_to(0.5)
    for path, w in pruner.layers.items():
        zero_units = (w == 0).all(dim=0)  # Conv1D weight is (in, out): an output unit is a column
        assert int(zero_units.sum()) == w.shape[1] // 2, path


def test_clean_path_strips_wrappers():
    assert clean_path("base_model.bert.deltas.default.module.encoder.layer.0.output.dense") == \
        "bert.encoder.layer.0.output.dense"
    assert clean_path("base_model.model.layers.0.mlp.up_proj.base_layer") == "model.layers.0.mlp.up_proj"


def test_frozen_weights_name_the_fix():
    with pytest.raises(ConfigError, match="FullConfig"):
        Pruner(dt.attach(bert(), dt.LoRAConfig(r=2)), method="movement")
    with pytest.raises(ConfigError, match="movement|magnitude"):
        Pruner(_full_bert(), method="random")
    with pytest.raises(ConfigError, match="block"):
        Pruner(_full_bert(), structure="blocks", block=(5, 5))


def _prune_run(out, callbacks=(), stateless=False, **kw):
    """Full fine-tuning of tiny BERT with movement pruning: 2 epochs of 4 steps, a checkpoint every 2."""
    torch.manual_seed(0)
    model = _full_bert()
    pruner = Pruner(model, method="movement", final_sparsity=0.75, cooldown_steps=2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, VOCAB, (6,), generator=g).tolist(), "attention_mask": [1] * 6,
             "labels": i % 2} for i in range(16)]
    cfg = dt.train.TrainConfig(output_dir=str(out), epochs=2, batch_size=4, lr=1e-3, progress=False,
                               tensorboard=False, plot=False, warmup_ratio=0.0, checkpoint_every=2, **kw)
    cb = Stateless(pruner) if stateless else pruner
    dt.train.Trainer(model, cfg, data, collate_fn=dt.data.Collator(0), callbacks=[cb, *callbacks]).fit()
    return model, pruner


def test_interrupted_pruning_run_resumes_exactly(tmp_path):
    """Stopped by an exception after step 3 (checkpoint at 2), resumed in a fresh model and Pruner:
    movement scores, masks and weights end as in the uninterrupted run (the Trainer checkpoints
    the Pruner's state_dict). Without that state the resumed run differs."""
    ref_model, ref = _prune_run(tmp_path / "ref")
    with pytest.raises(Stop):
        _prune_run(tmp_path / "run", [stop_at(3)])
    model, resumed = _prune_run(tmp_path / "run", resume=True)
    assert resumed.step == ref.step == 8 and resumed.report() == ref.report()
    assert ref.report()["overall"] == pytest.approx(0.75)
    for path in ref.layers:
        assert torch.equal(resumed.scores[path], ref.scores[path]), path
        assert torch.equal(resumed.masks[path], ref.masks[path]), path
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())
    # the same interruption, but the Trainer cannot checkpoint the Pruner: the movement scores of
    # steps 1-2 are lost and the masks come out different
    with pytest.raises(Stop):
        _prune_run(tmp_path / "lost", [stop_at(3)], stateless=True)
    _, lost = _prune_run(tmp_path / "lost", stateless=True, resume=True)
    assert any(not torch.equal(lost.masks[p], ref.masks[p]) for p in ref.layers)


def test_pruner_state_is_json_and_round_trips():
    import json
    model = _full_bert()
    pruner = Pruner(model, method="movement", final_sparsity=0.5, total_steps=4)
    b = {"input_ids": torch.randint(3, VOCAB, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
         "labels": torch.tensor([0, 1, 0, 1])}
    model.train()
    model(**b).loss.backward()
    pruner(step=2)
    state = json.loads(json.dumps(pruner.state_dict()))
    fresh = Pruner(_full_bert(), method="movement", final_sparsity=0.5)
    fresh.load_state_dict(state)
    assert (fresh.step, fresh.total_steps, fresh.sparsity) == (2, 4, pruner.sparsity)
    for p in pruner.layers:
        assert pruner.scores[p].abs().sum() > 0
        assert torch.equal(fresh.scores[p], pruner.scores[p]) and torch.equal(fresh.masks[p], pruner.masks[p])
    with pytest.raises(ConfigError, match="method"):
        Pruner(_full_bert(), method="magnitude").load_state_dict(state)
