"""Speed options change how a step runs, never what it computes."""

from __future__ import annotations

import torch
from helpers import chat_train, made_up_text

from trainlab.engine.checkpoint import latest_checkpoint


def test_compile_trains_the_same_and_saves_plain_weights(runs_dir, tmp_path):
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    flags = ["--max-steps", "3", "--dropout", "0", "--eval-every", "3", "--log-every", "1", "--precision", "fp32"]
    assert chat_train(runs_dir, corpus, "--run-name", "plain", *flags) == 0
    assert chat_train(runs_dir, corpus, "--run-name", "compiled", "--compile", *flags) == 0
    plain, compiled = (latest_checkpoint(runs_dir / "chat" / n / "checkpoints") for n in ("plain", "compiled"))
    a, b = plain.tensors("gpt/model.pt"), compiled.tensors("gpt/model.pt")
    assert a.keys() == b.keys()  # no torch.compile wrapper names in the checkpoint
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = (c.tensors("gpt/train_state.pt")["losses"] for c in (plain, compiled))
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
