"""A trained chat model as a folder other tools read, and back: ``trainlab chat export``.

``hf`` (the default) is a Hugging Face folder that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load offline, with the same logits as trainlab's. The classic block is
GPT-2's own architecture (pre-LayerNorm, learned positions, exact GELU, 1/sqrt(head) scaled
attention, LayerNorm eps 1e-5), so ``GPT2LMHeadModel`` runs it exactly; the modern block with
rotary positions, RMSNorm and a SwiGLU MLP and no biases is ``LlamaForCausalLM`` (q/k/v
split out of the fused projection, gate/up/down as they are), and with QK-norm
``Qwen3ForCausalLM``. Any other combination (ReLU squared, a logit cap, ...) is refused in
one line naming the option (``architecture``). What maps where, for GPT-2:

    trainlab                         GPT2LMHeadModel
    tok.weight (V, D)                transformer.wte.weight (V+1, D): the last row is <unk>
    pos.weight (ctx, D)              transformer.wpe.weight
    blocks.i.ln1 / ln2               transformer.h.i.ln_1 / ln_2 (a bias the model lacks: zeros)
    blocks.i.attn.qkv.weight (3D, D) transformer.h.i.attn.c_attn.weight (D, 3D): GPT-2's Conv1D
                                     stores its weight transposed
    blocks.i.attn.proj               transformer.h.i.attn.c_proj (transposed)
    blocks.i.mlp.up / down           transformer.h.i.mlp.c_fc / c_proj (transposed)
    ln_f                             transformer.ln_f
    head.weight (V, D)               lm_head.weight (V+1, D), tied to wte when the model ties them

The tokenizer (the ``tokenizers`` library, loaded as ``PreTrainedTokenizerFast``) has one
token per character of the run's vocabulary, ids as in ``vocab.json``, no merges, and
``<unk>`` (id V) for characters the corpus lacked. That extra id has zero embedding and
head rows, and ``generation_config.json`` suppresses it, so it is never generated; the first
V logits are the model's own. There is no end-of-text token: a character model generates
until its length limit.

``safetensors`` is the weights alone under trainlab's names, with ``model_config.json`` and
``vocab.json``, for people who want no transformers.

Either folder holds ``trainlab.json`` (format, version, the corpus's dialogue style), so
``chat generate``, ``repl`` and ``serve`` take an exported folder as ``--checkpoint``
(``load_exported``). A folder is written in a temporary place beside ``--out`` and renamed
into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from trainlab import __version__
from trainlab.chat.config import GPTConfig
from trainlab.chat.data import CharVocab
from trainlab.chat.loading import ChatModel, last_val_loss
from trainlab.chat.model import GPT, RMS_EPS
from trainlab.config import UsageError, flat_settings
from trainlab.engine.errors import CheckpointError

FORMATS = ("hf", "safetensors")
MARKER = "trainlab.json"
UNK = "<unk>"


# -- the mapping, as plain functions -----------------------------------------------------------
def architecture(cfg: GPTConfig) -> str:
    """The transformers architecture that computes exactly what ``GPT(cfg)`` does: gpt2 for the
    classic block, llama for rotary + RMSNorm + SwiGLU without biases, qwen3 for that with
    QK-norm; anything else is refused in one line naming the option that has no mapping."""
    extras = bool(cfg.logit_softcap) or cfg.pair_embedding  # pieces no family has
    if cfg.classic_block and not extras:
        return "gpt2"
    if cfg.positions == "rotary" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.bias and not extras:
        return "qwen3" if cfg.qk_norm else "llama"
    for name, bad, why in (("logit_softcap", bool(cfg.logit_softcap), "no transformers family caps logits so"),
                           ("pair_embedding", cfg.pair_embedding, "no transformers family embeds token pairs"),
                           ("mlp", cfg.mlp == "relu2", "ReLU squared is in no transformers family"),
                           ("positions", cfg.positions == "learned", "learned positions with the modern pieces"),
                           ("norm", cfg.norm == "layernorm", "LayerNorm with rotary positions"),
                           ("mlp", cfg.mlp != "swiglu", f"a {cfg.mlp} MLP with rotary positions"),
                           ("bias", cfg.bias, "biases with the Llama block")):
        if bad:
            raise UsageError(f"--format hf: the model's {name} ({getattr(cfg, name)}) has no exact transformers "
                             f"mapping ({why}); --format safetensors exports it for trainlab")
    raise UsageError("--format hf: this block has no exact transformers mapping; use --format safetensors")


def hf_config(cfg: GPTConfig) -> dict[str, Any]:
    """``config.json`` of the transformers model that computes what ``GPT(cfg)`` does."""
    arch = architecture(cfg)
    if arch != "gpt2":
        return {
            "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"], "model_type": arch,
            "vocab_size": cfg.vocab_size + 1, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.nhead, "num_key_value_heads": cfg.nhead,
            "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context_len, "hidden_act": "silu",
            "rms_norm_eps": RMS_EPS, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
            "rope_theta": cfg.rope_base, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": bool(cfg.tie_weights), "use_cache": True, "use_sliding_window": False,
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": cfg.vocab_size, "torch_dtype": "float32",
        }
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size + 1,  # + <unk>
        "n_positions": cfg.context_len, "n_ctx": cfg.context_len, "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers, "n_head": cfg.nhead, "n_inner": cfg.d_ff,
        "activation_function": "gelu",  # exact GELU, as F.gelu (not gelu_new, GPT-2's tanh form)
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(cfg.tie_weights), "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": cfg.vocab_size,
        "torch_dtype": "float32",
    }


def with_unk(w: torch.Tensor) -> torch.Tensor:
    """(V, D) -> (V+1, D): the <unk> row zero."""
    return torch.cat([w, w.new_zeros(1, w.shape[1])])


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """trainlab weights under the names of ``architecture(model.cfg)`` (fp32, contiguous, none shared)."""
    cfg = model.cfg
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    D = cfg.d_model
    if architecture(cfg) != "gpt2":
        out = {"model.embed_tokens.weight": with_unk(sd["tok.weight"]), "model.norm.weight": sd["ln_f.weight"].clone()}
        for i in range(cfg.num_layers):
            p, h = f"blocks.{i}.", f"model.layers.{i}."
            q, k, v = sd[p + "attn.qkv.weight"].split(D, dim=0)
            out.update({h + "input_layernorm.weight": sd[p + "ln1.weight"].clone(),
                        h + "post_attention_layernorm.weight": sd[p + "ln2.weight"].clone(),
                        h + "self_attn.q_proj.weight": q.contiguous(), h + "self_attn.k_proj.weight": k.contiguous(),
                        h + "self_attn.v_proj.weight": v.contiguous(),
                        h + "self_attn.o_proj.weight": sd[p + "attn.proj.weight"].clone(),
                        h + "mlp.gate_proj.weight": sd[p + "mlp.gate.weight"].clone(),
                        h + "mlp.up_proj.weight": sd[p + "mlp.up.weight"].clone(),
                        h + "mlp.down_proj.weight": sd[p + "mlp.down.weight"].clone()})
            if cfg.qk_norm:
                out[h + "self_attn.q_norm.weight"] = sd[p + "attn.q_norm.weight"].clone()
                out[h + "self_attn.k_norm.weight"] = sd[p + "attn.k_norm.weight"].clone()
        if not cfg.tie_weights:
            out["lm_head.weight"] = with_unk(sd["head.weight"])
        return out

    def bias(name: str, n: int) -> torch.Tensor:
        return sd[name].clone() if name in sd else torch.zeros(n)

    out = {"transformer.wte.weight": with_unk(sd["tok.weight"]), "transformer.wpe.weight": sd["pos.weight"].clone()}
    for i in range(cfg.num_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"].clone()
            out[h + theirs + ".bias"] = bias(p + ours + ".bias", D)
        for ours, theirs, n in (("attn.qkv", "attn.c_attn", 3 * D), ("attn.proj", "attn.c_proj", D),
                                ("mlp.up", "mlp.c_fc", cfg.d_ff), ("mlp.down", "mlp.c_proj", D)):
            out[h + theirs + ".weight"] = sd[p + ours + ".weight"].t().contiguous()  # Conv1D: (in, out)
            out[h + theirs + ".bias"] = bias(p + ours + ".bias", n)
    out["transformer.ln_f.weight"] = sd["ln_f.weight"].clone()
    out["transformer.ln_f.bias"] = bias("ln_f.bias", D)
    if not cfg.tie_weights:
        out["lm_head.weight"] = with_unk(sd["head.weight"])
    return out


def from_hf(config: dict[str, Any], sd: dict[str, torch.Tensor], bias: bool | None = None) -> GPT:
    """The trainlab model of an exported GPT-2 folder (its config.json and weights). ``bias``:
    whether the model has biases (default: whether any bias is not zero; an export writes the
    biases a model lacks as zeros)."""
    if config.get("model_type") in ("llama", "qwen3"):
        return _from_llama(config, sd)
    if config.get("model_type") != "gpt2" or config.get("activation_function") != "gelu":
        raise CheckpointError("not a trainlab export: config.json is not an exact-GELU GPT-2, a Llama or a Qwen3")
    n = int(config["n_embd"])
    has_bias = any(float(sd[k].abs().max()) != 0.0 for k in sd if k.endswith(".bias")) if bias is None else bias
    cfg = GPTConfig(d_model=n, nhead=int(config["n_head"]), num_layers=int(config["n_layer"]),
                    dim_feedforward=int(config.get("n_inner") or 4 * n), context_len=int(config["n_positions"]),
                    dropout=0.0, tie_weights=bool(config.get("tie_word_embeddings", True)), bias=has_bias,
                    vocab_size=int(config["vocab_size"]) - 1)
    model = GPT(cfg)
    ours: dict[str, torch.Tensor] = {"tok.weight": sd["transformer.wte.weight"][:-1],
                                     "pos.weight": sd["transformer.wpe.weight"]}
    for i in range(cfg.num_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for mine, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            ours[p + mine + ".weight"] = sd[h + theirs + ".weight"]
            if has_bias:
                ours[p + mine + ".bias"] = sd[h + theirs + ".bias"]
        for mine, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            ours[p + mine + ".weight"] = sd[h + theirs + ".weight"].t()
            if has_bias:
                ours[p + mine + ".bias"] = sd[h + theirs + ".bias"]
    ours["ln_f.weight"] = sd["transformer.ln_f.weight"]
    if has_bias:
        ours["ln_f.bias"] = sd["transformer.ln_f.bias"]
    ours["head.weight"] = ours["tok.weight"] if cfg.tie_weights else sd["lm_head.weight"][:-1]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if [k for k in missing if k != "head.weight"] or unexpected:
        raise CheckpointError(f"exported weights do not fit the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    return model


def _from_llama(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> GPT:
    rope = config.get("rope_parameters") or {}
    cfg = GPTConfig(d_model=int(config["hidden_size"]), nhead=int(config["num_attention_heads"]),
                    num_layers=int(config["num_hidden_layers"]), dim_feedforward=int(config["intermediate_size"]),
                    context_len=int(config["max_position_embeddings"]), dropout=0.0,
                    tie_weights=bool(config.get("tie_word_embeddings", False)), bias=False, positions="rotary",
                    rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))), norm="rmsnorm",
                    qk_norm=config["model_type"] == "qwen3", mlp="swiglu", vocab_size=int(config["vocab_size"]) - 1)
    model = GPT(cfg)
    ours = {"tok.weight": sd["model.embed_tokens.weight"][:-1], "ln_f.weight": sd["model.norm.weight"]}
    for i in range(cfg.num_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        ours.update({p + "ln1.weight": sd[h + "input_layernorm.weight"],
                     p + "ln2.weight": sd[h + "post_attention_layernorm.weight"],
                     p + "attn.qkv.weight": torch.cat([sd[h + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                     p + "attn.proj.weight": sd[h + "self_attn.o_proj.weight"],
                     p + "mlp.gate.weight": sd[h + "mlp.gate_proj.weight"],
                     p + "mlp.up.weight": sd[h + "mlp.up_proj.weight"],
                     p + "mlp.down.weight": sd[h + "mlp.down_proj.weight"]})
        if cfg.qk_norm:
            ours[p + "attn.q_norm.weight"] = sd[h + "self_attn.q_norm.weight"]
            ours[p + "attn.k_norm.weight"] = sd[h + "self_attn.k_norm.weight"]
    ours["head.weight"] = ours["tok.weight"] if cfg.tie_weights else sd["lm_head.weight"][:-1]
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"exported weights do not fit the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    return model


def tokenizer_json(vocab: CharVocab) -> str:
    """A ``tokenizers`` tokenizer: one token per character (ids as trainlab's), no merges,
    ``<unk>`` for any other character, decoded by joining the characters as they are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    table = {c: i for i, c in enumerate(vocab.chars)}
    table[UNK] = len(vocab.chars)
    tok = Tokenizer(models.WordLevel(table, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tok.decoder = decoders.Fuse()  # characters joined with nothing between them
    return tok.to_str()


# -- the folders -------------------------------------------------------------------------------
def count(n: Any) -> str:
    """A count with thousands separators, or 'an unknown number of' where the run did not record
    it (a checkpoint written before ``corpus.json`` existed)."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "an unknown number of"


def model_card(meta: dict[str, Any], cfg: GPTConfig, fmt: str) -> str:
    """README.md with the Hub's YAML metadata header: what it was trained on and how, what it
    is for and what it is not."""
    name = meta.get("corpus_name") or "a user's text"
    loss = meta.get("val_loss")
    params = meta.get("parameters")
    header = ["---", "library_name: " + ("transformers" if fmt == "hf" else "safetensors"),
              "pipeline_tag: text-generation", "tags:", "- trainlab", "- character-level", "- gpt2",
              "model-index:", f"- name: {json.dumps(meta.get('run', 'trainlab-chat'))}", "  results:",
              "  - task: {type: text-generation}",
              f"    dataset: {{name: {json.dumps(name)}, type: text}}",
              f"    metrics: [{{type: loss, name: val loss (nats per character), value: "
              f"{'null' if loss is None else round(float(loss), 4)}}}]", "---", ""]
    lines = [f"# {meta.get('run', 'trainlab chat model')}: a character-level GPT", "",
             f"Trained with trainlab {__version__} on **{name}** "
             f"({count(meta.get('corpus_characters'))} characters, {cfg.vocab_size} distinct), "
             f"for {count(meta.get('step'))} steps; validation loss "
             f"{'n/a' if loss is None else f'{float(loss):.4f}'} nats per character on the last "
             f"{meta.get('val_fraction', '?')} of the text (a contiguous span: no window of it was trained on).", "",
             "## The model", "",
             f"- Block: {block_words(cfg)}, "
             f"{cfg.num_layers} layers of width {cfg.d_model}, {cfg.nhead} heads, MLP {cfg.d_ff}, context "
             f"{cfg.context_len} characters, {'tied' if cfg.tie_weights else 'untied'} output head"
             + (f"; {params:,} parameters" if params else "") + ".",
             "- Tokens: one per character of the training text, ids as in the run's `vocab.json`; `<unk>` "
             f"(id {cfg.vocab_size}) stands for any other character: it has zero weights and generation "
             "suppresses it.",
             "- Exported as " + (f"`{HF_CLASSES[architecture(cfg)]}`: the logits equal trainlab's within 1e-5 in fp32."
                                 if fmt == "hf" else "safetensors under trainlab's own names (no transformers)."),
             "", "## Trained with", "", "```bash", meta.get("command", "trainlab chat train ..."), "```", "",
             "## Use", ""]
    if fmt == "hf":
        lines += ["```python", "from transformers import pipeline", "",
                  "generate = pipeline(\"text-generation\", model=\"PATH\")",
                  "print(generate(\"ROMEO:\\n\", max_new_tokens=200, do_sample=False)[0][\"generated_text\"])",
                  "```", "", "Or with trainlab: `trainlab chat repl --checkpoint PATH` (and `generate`, `serve`).", ""]
    else:
        lines += ["`trainlab chat repl --checkpoint PATH` (and `generate`, `serve`), or load `model.safetensors` "
                  "with the `safetensors` library and `model_config.json` for the shapes.", ""]
    lines += ["## What it is for, and what it is not", "",
              "For play and study: text in the style of its corpus, a chat in its dialogue format, a small "
              "model to read and measure. It is not a source of facts or advice: it knows nothing but the "
              "characters of one text, invents freely, and repeats whatever that text holds (its biases "
              "included). It has no safety tuning.", ""]
    return "\n".join(header + lines)


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def block_words(cfg: GPTConfig) -> str:
    if cfg.classic_block:
        return "trainlab's classic GPT-2 block (pre-LayerNorm, learned positions, exact GELU" + \
            (", character-pair embeddings)" if cfg.pair_embedding else ")")
    parts = [f"{cfg.positions} positions", cfg.norm, f"a {cfg.mlp} MLP"]
    if cfg.qk_norm:
        parts.append("QK-norm")
    if cfg.zero_init:
        parts.append("zero-initialised output projections")
    if cfg.logit_softcap:
        parts.append(f"logits capped at {cfg.logit_softcap:g}")
    if cfg.pair_embedding:
        parts.append("character-pair embeddings")
    return "trainlab's modern block (" + ", ".join(parts) + ")"


def _meta_from(ckpt: Any) -> dict[str, Any]:
    """What the card and trainlab.json say, from the checkpoint and its run."""
    from trainlab.chat.config import ChatDataConfig, ChatTaskConfig
    from trainlab.engine.train_config import TrainConfig

    config = ckpt.json("config.json") if "config.json" in ckpt.sums else {}
    corpus = ckpt.json("corpus.json") if "corpus.json" in ckpt.sums else {}
    values = flat_settings(config) if isinstance(config, dict) else {}
    meta: dict[str, Any] = {"step": ckpt.step, "corpus_characters": corpus.get("characters"),
                            "corpus_sha256": corpus.get("sha256"), "dialogue": corpus.get("dialogue") or {},
                            "val_fraction": values.get("val_fraction", ChatDataConfig.val_fraction)}
    if values.get("text"):
        meta["corpus_name"] = Path(str(values["text"])).name
    loss = last_val_loss(ckpt)
    if loss is not None:
        meta["val_loss"] = loss
    # the command that trains it again: every setting of the run that differs from what
    # `chat train` starts from (the defaults under its default preset)
    from trainlab.config import DEFAULT_PRESETS, load_preset

    base = load_preset("chat", DEFAULT_PRESETS["chat"])
    flags = []
    for cls in (ChatDataConfig, GPTConfig, ChatTaskConfig, TrainConfig):
        for f in fields(cls):
            if f.name in values and f.metadata.get("cli", True) and \
                    f.name not in ("runs_dir", "progress", "run_name", "tag") and \
                    values[f.name] != base.get(f.name, f.default):
                v = values[f.name]
                flag = "--" + f.name.replace("_", "-")
                flags.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {v}")
    meta["command"] = "trainlab chat train " + " ".join(flags)
    return meta


# every entry an export writes, in either format: a folder holding anything else holds a
# user's files, and --force never replaces it
EXPORT_FILES = frozenset({MARKER, "README.md", "model.safetensors", "config.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "model_config.json", "vocab.json"})


def check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that export may not replace: anything but a folder; a non-empty
    folder that is not an earlier export (its marker present), ``--force`` or not; an earlier
    export holding an entry export does not write (a user's file); an earlier export without
    ``--force``. Nothing is touched."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not is_export(out):
        raise UsageError(f"--out: {out} is not empty and is not an earlier export (no {MARKER}); export writes "
                         "only into a new or empty folder or over an earlier export (nothing in it was touched)")
    foreign = [name for name in entries if name not in EXPORT_FILES]
    if foreign:
        raise UsageError(f"--out: {out} is an earlier export holding files export did not write "
                         f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); move them out or choose "
                         "another folder (nothing in it was touched)")
    if not force:
        raise UsageError(f"--out: {out} holds an earlier export; pass --force to replace it (nothing in it was "
                         "touched)")


def export(ckpt: Any, out: str | Path, fmt: str = "hf", force: bool = False, run: str | None = None) -> Path:
    """Write the checkpoint's model to the folder ``out`` as ``fmt``; returns the folder.
    ``out`` is new, empty, or (with ``force``) an earlier export holding only what export
    writes (``check_out``); nothing in it is touched until the new folder is complete, then it
    replaces it in one rename."""
    from safetensors.torch import save_file

    from trainlab.chat.loading import load_chat_model

    if fmt not in FORMATS:
        raise UsageError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out).resolve()  # '.' has no name to put a temporary folder beside
    check_out(out, force)
    cm = load_chat_model(ckpt, torch.device("cpu"))
    cfg = cm.model.cfg
    if fmt == "hf":
        architecture(cfg)  # a block with no exact mapping is refused before anything is written
    meta = {**_meta_from(ckpt), "run": run or ckpt.path.name,
            "parameters": sum(p.numel() for p in cm.model.parameters())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        marker = {"format": f"trainlab-{fmt}", "trainlab": __version__, "run": meta["run"], "step": meta["step"],
                  "val_loss": meta.get("val_loss"), "dialogue": meta["dialogue"], "vocab": cm.vocab.chars,
                  "model_config": asdict(cfg)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=True), encoding="utf-8")
        (tmp / "README.md").write_text(model_card(meta, cfg, fmt), encoding="utf-8")
        if fmt == "hf":
            save_file(to_hf_state_dict(cm.model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2), encoding="utf-8")
            gen = {"do_sample": True, "temperature": 0.8, "max_new_tokens": 400, "suppress_tokens": [cfg.vocab_size],
                   "pad_token_id": cfg.vocab_size, "eos_token_id": None, "bos_token_id": None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
            (tmp / "tokenizer.json").write_text(tokenizer_json(cm.vocab), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "pad_token": UNK,
                "model_max_length": cfg.context_len, "clean_up_tokenization_spaces": False,
                "add_prefix_space": False}, indent=2), encoding="utf-8")
            (tmp / "special_tokens_map.json").write_text(json.dumps({"unk_token": UNK, "pad_token": UNK}),
                                                         encoding="utf-8")
        else:
            sd = {k: v.detach().float().cpu().contiguous() for k, v in cm.model.state_dict().items()
                  if not (cfg.tie_weights and k == "head.weight")}  # tied: one tensor, as the model holds it
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "model_config.json").write_text(json.dumps(asdict(cfg), indent=2), encoding="utf-8")
            (tmp / "vocab.json").write_text(cm.vocab.to_json(), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():  # an empty folder, or (--force) an earlier export: it goes only once the new one is whole
            check_out(out, force)  # again: a user may have put a file there while the model was written
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            for name in EXPORT_FILES:  # only what an export writes; whatever else arrived since stays
                (old / name).unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:
                print(f"trainlab: warning: {old} kept: it gained files while the export was written", file=sys.stderr)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def load_exported(folder: str | Path, device: torch.device) -> tuple[ChatModel, dict[str, Any]]:
    """A folder ``export`` wrote, as the model trainlab chats with, and what ``serve`` shows of it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from trainlab.config import build

    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if not isinstance(marker, dict) or marker.get("format") not in ("trainlab-hf", "trainlab-safetensors"):
            raise ValueError("unknown format")
        vocab = CharVocab(str(marker["vocab"]))
        sd = load_file(str(folder / "model.safetensors"))
        if marker["format"] == "trainlab-hf":
            bias = (marker.get("model_config") or {}).get("bias")
            model = from_hf(json.loads((folder / "config.json").read_text(encoding="utf-8")), sd,
                            bias if isinstance(bias, bool) else None)
        else:
            cfg = build(GPTConfig, json.loads((folder / "model_config.json").read_text(encoding="utf-8")))
            model = GPT(cfg)
            if cfg.tie_weights:
                sd["head.weight"] = sd["tok.weight"]
            model.load_state_dict(sd)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: a damaged or unknown trainlab export ({str(e).splitlines()[0][:200]})") \
            from None
    if model.cfg.vocab_size != vocab.size:
        raise CheckpointError(f"{folder}: the model has {model.cfg.vocab_size} tokens, its vocabulary {vocab.size}")
    dialogue = marker.get("dialogue") if isinstance(marker.get("dialogue"), dict) else {}
    info = {"model": str(marker.get("run") or folder.name), "run": str(marker.get("run") or folder.name),
            "step": marker.get("step"), "checkpoint": str(folder), "created": int((folder / MARKER).stat().st_mtime)}
    if isinstance(marker.get("val_loss"), (int, float)):
        info["val_loss"] = float(marker["val_loss"])
    return ChatModel(model.to(device).eval(), vocab, dialogue), info
