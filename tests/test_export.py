"""`trainlab chat export`: a Hugging Face folder that transformers loads offline with the same
logits and the same greedy text, its tokenizer and card; the safetensors format; exported
folders back in generate and serve; and the refusals."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import register_runs_dir
from helpers import chat_train, made_up_text

from trainlab.chat.export import load_exported
from trainlab.chat.loading import load_chat_model
from trainlab.cli import main
from trainlab.engine.tracking import resolve_checkpoint

transformers = pytest.importorskip("transformers", reason="the tests install trainlab[dev], which has transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from the folder; nothing is fetched
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "ANNA:\nThe b"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny chat models of the classic block, one tied and bias-free (the default), one
    untied with biases, each with a context long enough for 200 characters after the prompt."""
    tmp = tmp_path_factory.mktemp("export")
    runs = register_runs_dir(tmp / "runs")
    corpus = tmp / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    common = ["--max-steps", "40", "--eval-every", "40", "--context-len", "256", "--sample-every", "0",
              "--precision", "fp32"]
    assert chat_train(runs, corpus, "--run-name", "tied", *common) == 0
    assert chat_train(runs, corpus, "--run-name", "untied", "--no-tie-weights", "--bias", *common) == 0
    modern = ["--positions", "rotary", "--norm", "rmsnorm", "--mlp", "swiglu", "--zero-init"]
    assert chat_train(runs, corpus, "--run-name", "llama", *modern, "--no-tie-weights", *common) == 0
    assert chat_train(runs, corpus, "--run-name", "qwen3", *modern, "--qk-norm", *common) == 0
    assert chat_train(runs, corpus, "--run-name", "relu2", "--positions", "rotary", "--mlp", "relu2", *common) == 0
    assert chat_train(runs, corpus, "--run-name", "pair", *modern, "--pair-embedding", *common) == 0
    return runs


ARCHITECTURES = {"tied": "GPT2LMHeadModel", "untied": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def export(runs, run, out, *flags) -> int:
    return main(["chat", "export", "--checkpoint", run, "--runs-dir", str(runs), "--out", str(out), *flags])


def trainlab_greedy(runs, checkpoint, capsys, n: int = 200) -> str:
    capsys.readouterr()
    assert main(["chat", "generate", "--checkpoint", str(checkpoint), "--runs-dir", str(runs), "--prompt", PROMPT,
                 "--temperature", "0", "--max-new-tokens", str(n), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and out.endswith("\n")
    return out[len(PROMPT):-1]


@pytest.mark.parametrize("run", sorted(ARCHITECTURES))
def test_transformers_loads_the_folder_with_the_same_logits_and_greedy_text(runs, tmp_path, capsys, run):
    """Each block: the classic one (tied, and untied with biases) as GPT-2, the modern one as
    Llama and (with QK-norm) Qwen3."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, pipeline

    out = tmp_path / "hf"
    assert export(runs, run, out) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "trainlab.json"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == ARCHITECTURES[run] and isinstance(tok, PreTrainedTokenizerFast)
    cm = load_chat_model(resolve_checkpoint(runs, "chat", run), torch.device("cpu"))
    V = cm.vocab.size
    assert hf.config.tie_word_embeddings == cm.model.cfg.tie_weights

    # logits of a batch of texts from the corpus, within 1e-5 in fp32
    text = made_up_text()
    windows = [text[i:i + 200] for i in (0, 555, 1234, 4000)]
    ids = torch.tensor([cm.vocab.encode(w).tolist() for w in windows])  # (4, 200)
    assert torch.equal(torch.tensor(tok(windows)["input_ids"]), ids)  # the tokenizer gives trainlab's ids
    with torch.no_grad():
        ours, _ = cm.model(ids)  # (4, 200, V)
        theirs = hf(ids).logits  # (4, 200, V + 1)
    assert theirs.shape[-1] == V + 1
    assert (theirs[..., :V] - ours).abs().max().item() <= 1e-5

    # the pipeline's greedy 200 characters are trainlab's
    generate = pipeline("text-generation", model=str(out), tokenizer=str(out), device="cpu")
    got = generate(PROMPT, max_new_tokens=200, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert len(got) == 200 and got == trainlab_greedy(runs, run, capsys)


def test_the_tokenizer_round_trips_every_character_and_knows_unknown_ones(runs, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert export(runs, "tied", out) == 0
    tok = AutoTokenizer.from_pretrained(out)
    chars = json.loads((out / "trainlab.json").read_text())["vocab"]
    assert tok(chars)["input_ids"] == list(range(len(chars)))  # one token per character, in vocab.json's order
    assert tok.decode(list(range(len(chars)))) == chars  # spaces and newlines included, nothing added between
    for c in chars:
        assert tok.decode(tok(c)["input_ids"]) == c
    assert tok("A€B")["input_ids"] == [chars.index("A"), len(chars), chars.index("B")]  # € is <unk>
    assert tok.unk_token == "<unk>" and tok.unk_token_id == len(chars)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == [len(chars)]  # never generated


def test_the_model_card_says_what_was_trained_and_how(runs, tmp_path):
    out = tmp_path / "hf"
    assert export(runs, "tied", out) == 0
    card = (out / "README.md").read_text()
    head, _, body = card[4:].partition("\n---\n")
    assert card.startswith("---\n") and "library_name: transformers" in head and "pipeline_tag: text-generation" in head
    state = resolve_checkpoint(runs, "chat", "tied")
    loss = float(state.tensors("gpt/train_state.pt")["evals"][-1]["val_loss"])
    corpus = state.json("corpus.json")
    from trainlab import __version__

    for needle in ("play.txt", f"{corpus['characters']:,} characters", "for 40 steps", f"{loss:.4f}",
                   "2 layers of width 32", "2 heads", "context 256", f"trainlab {__version__}",
                   "trainlab chat train --text ", "--d-model 32", "--max-steps 40", "not a source of facts"):
        assert needle in body, needle
    assert f"value: {round(loss, 4)}" in head


def test_a_checkpoint_without_corpus_json_exports_with_its_count_unknown(runs, tmp_path):
    """Checkpoints written before corpus.json existed: the card says the count is unknown."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(resolve_checkpoint(runs, "chat", "tied").path, old)
    (old / "corpus.json").unlink()
    meta = json.loads((old / "meta.json").read_text())
    del meta["sha256"]["corpus.json"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert export(runs, str(old), tmp_path / "hf") == 0
    body = (tmp_path / "hf" / "README.md").read_text()
    assert "an unknown number of characters" in body and "for 40 steps" in body


def test_the_safetensors_format_and_exported_folders_back_in_generate(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "st"
    assert export(runs, "untied", out, "--format", "safetensors") == 0
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model_config.json", "vocab.json", "README.md",
                                               "trainlab.json"}
    weights = load_file(str(out / "model.safetensors"))
    cm = load_chat_model(resolve_checkpoint(runs, "chat", "untied"), torch.device("cpu"))
    assert weights.keys() == cm.model.state_dict().keys()
    for k, v in cm.model.state_dict().items():
        assert torch.equal(weights[k], v), k
    hf = tmp_path / "hf"
    assert export(runs, "untied", hf) == 0
    from_run = trainlab_greedy(runs, "untied", capsys)
    assert trainlab_greedy(runs, out, capsys) == from_run
    assert trainlab_greedy(runs, hf, capsys) == from_run
    loaded, info = load_exported(hf, torch.device("cpu"))
    assert info["run"] == "untied" and info["step"] == 40 and loaded.vocab.chars == cm.vocab.chars


def test_an_exported_folder_serves_as_the_run_does(runs, tmp_path):
    from test_serve import Live, raw

    out = tmp_path / "hf"
    assert export(runs, "tied", out) == 0
    body = {"prompt": PROMPT, "max_tokens": 80, "seed": 3, "temperature": 1.0}
    answers = []
    for source in (None, out):
        srv = Live(runs, run="tied", source=source)
        try:
            r = raw(srv.url, "/v1/completions", body)
            assert r.status_code == 200
            answers.append(r.json()["choices"][0]["text"])
        finally:
            srv.close()
    assert len(answers[0]) == 80 and answers[0] == answers[1]


def test_export_refuses_what_it_cannot_do_and_touches_nothing(runs, tmp_path, capsys, monkeypatch):
    from helpers import cli_train

    def error_line() -> str:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("trainlab: error: "), err
        return err[0]

    # a folder of the user's own is never replaced, --force or not, '.' included
    taken = tmp_path / "taken"
    taken.mkdir()
    mine = bytes(range(256)) * 3
    (taken / "mine.txt").write_bytes(mine)
    for flags in ((), ("--force",)):
        assert export(runs, "tied", taken, *flags) == 2
        assert "not an earlier export" in error_line()
        assert sorted(p.name for p in taken.iterdir()) == ["mine.txt"] and (taken / "mine.txt").read_bytes() == mine
    monkeypatch.chdir(taken)
    assert export(runs, "tied", ".", "--force") == 2
    assert "not an earlier export" in error_line() and (taken / "mine.txt").read_bytes() == mine
    monkeypatch.chdir(tmp_path)
    assert not list(tmp_path.glob(".taken*"))

    # an earlier export is replaced with --force only, and only while it holds nothing of the user's
    earlier = tmp_path / "earlier"
    assert export(runs, "tied", earlier) == 0
    capsys.readouterr()
    assert export(runs, "tied", earlier) == 2 and "--force" in error_line()
    assert export(runs, "tied", earlier, "--force", "--format", "safetensors") == 0
    capsys.readouterr()
    assert (earlier / "model_config.json").is_file() and not (earlier / "config.json").exists()
    (earlier / "notes.txt").write_bytes(mine)
    assert export(runs, "tied", earlier, "--force") == 2
    assert "notes.txt" in error_line() and (earlier / "notes.txt").read_bytes() == mine
    assert (earlier / "model_config.json").is_file()  # the earlier export is untouched too

    # a failed export leaves nothing half-written, and no temporary folder
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    assert export(runs, "tied", tmp_path / "never") == 1
    capsys.readouterr()
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))
    monkeypatch.undo()

    assert cli_train(runs, "--max-steps", "1", "--run-name", "mult") == 0
    capsys.readouterr()
    assert export(runs, "mult", tmp_path / "m") == 2
    assert "multiplication run" in error_line() and not (tmp_path / "m").exists()

    damaged = resolve_checkpoint(runs, "chat", "tied").path
    copy = tmp_path / "damaged"
    import shutil

    shutil.copytree(damaged, copy)
    (copy / "gpt" / "model.pt").write_bytes(b"not a tensor file")
    assert export(runs, str(copy), tmp_path / "d") == 2
    error_line()

    not_export = tmp_path / "plain"
    not_export.mkdir()
    (not_export / "config.json").write_text("{}")
    assert main(["chat", "generate", "--checkpoint", str(not_export), "--runs-dir", str(runs)]) == 2
    error_line()
    (not_export / "trainlab.json").write_text('{"format": "trainlab-hf"}')
    assert main(["chat", "generate", "--checkpoint", str(not_export), "--runs-dir", str(runs)]) == 2
    assert "export" in error_line()


@pytest.mark.parametrize("run,named", [("relu2", "mlp (relu2)"), ("pair", "pair_embedding (True)")])
def test_a_block_with_no_exact_mapping_is_refused_for_hf_and_exported_as_safetensors(runs, tmp_path, capsys, run,
                                                                                      named):
    assert export(runs, run, tmp_path / "hf") == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"trainlab: error: --format hf: the model's {named}") and "--format safetensors" in line
    assert not (tmp_path / "hf").exists()
    assert export(runs, run, tmp_path / "st", "--format", "safetensors") == 0
    assert trainlab_greedy(runs, tmp_path / "st", capsys) == trainlab_greedy(runs, run, capsys)
