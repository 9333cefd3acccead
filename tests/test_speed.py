"""Speed options change how a step runs, never what it computes."""

from __future__ import annotations

import torch
from helpers import made_up_text

from trainlab import runs
from trainlab.engine.checkpoint import latest_checkpoint


def test_compile_trains_the_same_and_saves_plain_weights(runs_dir, tmp_path):
    """Through the Python run path, so the members themselves can be looked at: with
    ``compile`` the training forward goes through a module torch.compile made, and dynamo
    compiled graphs for it; the weights saved are the plain module's, and the numbers match."""
    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    flags = {"text": str(corpus), "runs_dir": str(runs_dir), "progress": False, "tag": "test", "device": "cpu",
             "max_steps": 3, "dropout": 0.0, "eval_every": 3, "log_every": 1, "precision": "fp32",
             "num_layers": 1}  # one block to compile: 38 s from a cold cache, 43 s with two
    plain = runs.train("chat", runs.settings("chat", "chatgot-tiny", flags={**flags, "run_name": "plain"}),
                       echo=lambda line: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = runs.train("chat", runs.settings("chat", "chatgot-tiny",
                                                flags={**flags, "run_name": "compiled", "compile": True}),
                          echo=lambda line: None)
    (p,), (c,) = plain.members, compiled.members
    assert p.ddp is p.model and not isinstance(p.ddp, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(c.ddp, torch._dynamo.eval_frame.OptimizedModule) and c.ddp._orig_mod is c.model
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really was compiled and run
    assert c.step == p.step == 3
    plain_ck, compiled_ck = (latest_checkpoint(runs_dir / "chat" / n / "checkpoints") for n in ("plain", "compiled"))
    a, b = plain_ck.tensors("gpt/model.pt"), compiled_ck.tensors("gpt/model.pt")
    assert a.keys() == b.keys()  # no torch.compile wrapper names in the checkpoint
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = (ck.tensors("gpt/train_state.pt")["losses"] for ck in (plain_ck, compiled_ck))
    assert len(la) == len(lb) == 3
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
