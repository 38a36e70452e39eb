"""A run without a learning rate uses the trained delta's recommended one (DeltaConfig.recommended_lr),
says so at start, and reports it; a set lr always wins."""
import torch

import deltatune as dt
from deltatune.train.config import FULL_MODEL_LR, resolve_lr
from tiny import llama_cls


def _trainer(model, tmp_path, **kw):
    data = [{"input_ids": torch.tensor([3, 4, 5, 6]), "labels": torch.tensor(1)} for _ in range(4)]
    cfg = dt.train.TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, save=False, **kw)
    return dt.train.Trainer(model, cfg, data, collate_fn=lambda rows: {
        "input_ids": torch.stack([r["input_ids"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])})


def test_unset_lr_is_the_methods_recommended_rate_and_is_printed(tmp_path, capsys):
    model = dt.attach(llama_cls(), dt.IA3Config())
    trainer = _trainer(model, tmp_path)
    assert (trainer.lr, trainer.lr_source) == (dt.IA3Config.recommended_lr, "recommended for ia3")
    result = trainer.fit()
    assert result["lr"] == 3e-2
    assert "lr 0.03 (recommended for ia3; set lr to choose another)" in capsys.readouterr().err


def test_a_set_lr_wins_and_prints_nothing(tmp_path, capsys):
    trainer = _trainer(dt.attach(llama_cls(), dt.IA3Config()), tmp_path, lr=1e-4, progress=False)
    assert trainer.fit()["lr"] == 1e-4 and trainer.lr_source == "set"
    assert "recommended" not in capsys.readouterr().err


def test_several_trained_deltas_take_the_smallest_rate_and_frozen_ones_do_not_count():
    model = dt.attach(llama_cls(), dt.LoRAConfig(r=2), name="lora")
    model.add_delta("mam", dt.MAMConfig(prefix_length=2, bottleneck=8))
    lr, why = resolve_lr(dt.train.TrainConfig(), model)
    assert lr == 3e-4 and "smallest of the trained deltas' (lora: 0.001, mam: 0.0003)" in why
    model.set_trainable("mam", False)
    assert resolve_lr(dt.train.TrainConfig(), model)[0] == 1e-3


def test_partial_head_only_and_whole_layers_differ_and_a_plain_model_gets_full_fine_tunings_rate():
    assert dt.PartialConfig(modules_to_save=["score"]).recommended_lr == 1e-1
    assert dt.PartialConfig(last_k_layers=1).recommended_lr == 1e-3
    lr, why = resolve_lr(dt.train.TrainConfig(), llama_cls())
    assert lr == FULL_MODEL_LR == 5e-5 and "no deltas" in why
