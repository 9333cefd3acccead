"""Small builders shared by tests."""

from __future__ import annotations

from dataclasses import asdict

from trainlab.engine.loop import TrainConfig
from trainlab.multiply.data import MultiplyDataConfig
from trainlab.multiply.loss import LossConfig
from trainlab.multiply.models import Seq2SeqConfig
from trainlab.multiply.task import MultiplyTask, MultiplyTaskConfig, TeacherForcingConfig


def tiny_multiply(train: TrainConfig, min_digits=1, max_digits=1, tf=None, **model_kw):
    data = MultiplyDataConfig(min_digits=min_digits, max_digits=max_digits)
    model = Seq2SeqConfig(**{**dict(d_model=32, nhead=4, num_layers=1, num_latent=2), **model_kw})
    task = MultiplyTask(data, model, LossConfig(), tf or TeacherForcingConfig(), MultiplyTaskConfig(eval_samples=50), train)
    config = {"data": asdict(data), "model": asdict(model), "train": asdict(train)}
    return task, config
