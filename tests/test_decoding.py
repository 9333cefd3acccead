"""The decoding pass (chat/decoding.py): the same numbers as the model's own forward, a
fixed-shape cache for generate, and the compiled pass with its cache under the runs folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import KERNELS_ROOT, chat_train, link_suite_kernels, made_up_text

from trainlab.chat.config import GPTConfig, SamplingConfig
from trainlab.chat.decoding import Decoder, RowCache, compile_cache_dir, decode_pass, rowwise_linear
from trainlab.chat.model import GPT
from trainlab.chat.sampling import generate

MODERN = dict(d_model=32, nhead=4, num_layers=2, context_len=16, dropout=0.0, vocab_size=11, positions="rotary",
              norm="rmsnorm", qk_norm=True, mlp="swiglu", tie_weights=False, pair_embedding=True)
CLASSIC = dict(d_model=32, nhead=4, num_layers=2, context_len=16, dropout=0.0, vocab_size=11, bias=True,
               mlp="relu2", logit_softcap=15.0)
ROOT = Path(__file__).resolve().parents[1]


def random_model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections and pair table would hide mistakes
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_rowwise_linear_is_a_linear_layer():
    x, w, b = torch.randn(3, 20), torch.randn(7, 20), torch.randn(7)
    torch.testing.assert_close(rowwise_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rowwise_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [MODERN, CLASSIC], ids=["modern", "classic"])
@pytest.mark.parametrize("linear", [F.linear, rowwise_linear], ids=["F.linear", "rowwise"])
def test_a_decoding_pass_continues_a_cache_as_the_forward_pass_does(kw, linear):
    model = random_model(**kw)
    x = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        full, _ = model(x)
        cache = RowCache(model)
        rows = [RowCache(model) for _ in range(2)]
        keys = torch.cat([c.keys for c in rows], dim=1)  # (L, 2, H, ctx, hd): two rows at once
        values = torch.cat([c.values for c in rows], dim=1)
        _, kv = model(x[:, :5])
        for i, (k, v) in enumerate(kv):
            keys[i, :, :, :5], values[i, :, :, :5] = k, v
        for t in range(5, 12):
            logits, k, v = decode_pass(model, x[:, t], torch.tensor([t, t]), x[:, t - 1], keys, values, linear=linear)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)
            keys[:, :, :, t], values[:, :, :, t] = k, v
        # and one row through the fixed-shape cache generate uses
        first = cache.fill(model, x[0, :5].tolist())
        torch.testing.assert_close(first, full[0, 4], rtol=1e-4, atol=1e-4)
        for t in range(5, 12):
            got = cache.step(lambda *a: decode_pass(model, *a, linear=linear), int(x[0, t]))
            torch.testing.assert_close(got, full[0, t], rtol=1e-4, atol=1e-4)
        assert cache.length == 12


@pytest.mark.parametrize("kw", [MODERN, CLASSIC], ids=["rotary", "learned"])
def test_generate_through_the_fixed_cache_is_greedy_decoding_of_the_model(kw):
    """Greedy text from generate (cache, refills past the context) equals argmax of a whole
    forward pass over the last window at every step: all of it for learned positions, which
    rebuild the window when it fills; up to the first slide for rotary ones (past it their
    keys keep the text that went before, which no whole pass over a window holds; the slide
    itself is checked below)."""
    model = random_model(**kw)
    ctx = model.cfg.context_len
    cfg = SamplingConfig(temperature=0, max_new_tokens=40, stop_at="none", repetition_window=0)
    got = "".join(generate(model, [1, 2, 3], cfg, lambda i: "abcdefghijk"[i], torch.Generator()))
    tokens, want = [1, 2, 3], ""
    keep = ctx - ctx // 4
    window = tokens[:]
    with torch.no_grad():
        for _ in range(40):
            logits, _ = model(torch.tensor([window]))
            tok = int(logits[0, -1].argmax())
            tokens.append(tok)
            want += "abcdefghijk"[tok]
            window = window + [tok] if len(window) < ctx else tokens[-keep:]
    if kw.get("positions") == "rotary":
        n = ctx - 3 + 1  # the characters before the cache first slides
        assert got[:n] == want[:n] and len(got) == 40
    else:
        assert got == want


def test_the_cache_folder_names_the_model_shape_and_build(tmp_path):
    a, b = random_model(**MODERN), random_model(**CLASSIC)
    assert compile_cache_dir(tmp_path, a) == compile_cache_dir(tmp_path, random_model(**MODERN))
    assert compile_cache_dir(tmp_path, a) != compile_cache_dir(tmp_path, b)
    assert compile_cache_dir(tmp_path, a) != compile_cache_dir(tmp_path, a.to(torch.bfloat16))


def test_compiling_is_for_fp32_weights_on_a_cpu():
    d = Decoder(random_model(**MODERN).to(torch.bfloat16), compiled=True)
    assert d.prepare() == ("decoding: plain pass (compiled decoding is for fp32 weights on a CPU; these are bfloat16 "
                           "on cpu)")
    assert d.compiled is None


def generate_command(runs: Path, decode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "TRAINLAB_MALLOC": "system",
           "TORCH_LOGS": "recompiles"}
    cmd = [sys.executable, "-m", "trainlab", "chat", "generate", "--checkpoint", "dec", "--runs-dir", str(runs),
           "--decode", decode, "--seed", "1", "--temperature", "0.9", "--max-new-tokens", "300", "--stop-at", "none",
           "--prompt", "BORIS:"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_generate_compiled_writes_the_plain_text_and_survives_a_damaged_cache(runs_dir, tmp_path):
    """`chat generate --decode compiled` in a fresh process: one line on how it compiled, its
    cache under the runs folder, and the text of the plain pass from the same seed, past the
    context (every span of the cache, refills) with no second compile. Then every
    file of that cache is overwritten with junk, and the next start still compiles (the cache
    is rebuilt, never trusted) and writes the same text."""

    corpus = tmp_path / "play.txt"
    corpus.write_text(made_up_text(), encoding="utf-8")
    assert chat_train(runs_dir, corpus, "--run-name", "dec", "--max-steps", "30", "--lr", "0.01",
                      "--context-len", "128", "--precision", "fp32") == 0  # decoding is fp32 whatever it trained in
    plain = generate_command(runs_dir, "plain")
    assert "decoding:" not in plain.stderr
    compiled = generate_command(runs_dir, "compiled")
    assert "decoding: compiled in" in compiled.stderr and str(runs_dir / ".compiled") in compiled.stderr
    assert compiled.stdout == plain.stdout and len(plain.stdout) > 300
    assert "Recompiling" not in compiled.stderr, compiled.stderr[-3000:]
    files = [p for p in (runs_dir / ".compiled").rglob("*") if p.is_file()]
    assert files, "nothing was cached"
    for p in files:
        p.write_bytes(b"junk" * 16)
    again = generate_command(runs_dir, "compiled")
    assert "decoding: compiled in" in again.stderr and again.stdout == plain.stdout
    # the server's row kernels as generate's pass (the suite's build, linked in: a build takes 25-50 s)
    link_suite_kernels(runs_dir)
    rows = generate_command(runs_dir, "kernels")
    assert "decoding: row kernels ready" in rows.stderr and rows.stdout == plain.stdout, rows.stderr[-2000:]


# -- the row kernels (chat/kernels.py) and the server's pass through them -------------------------


@pytest.fixture(scope="module")
def kernels():
    from trainlab.chat.kernels import load_kernels

    module, note = load_kernels(KERNELS_ROOT)
    assert module is not None, note  # CI has a C++ compiler and ninja: the kernels must build there
    return module


def test_the_kernels_split_their_work_over_torchs_threads(kernels):
    """at::parallel_for is OpenMP written inline in ATen's headers: a build without -fopenmp
    ignores it and runs every kernel on one thread (as the kernels did until 2026-12-03, when
    the thread-count tests below compared one thread with itself)."""
    previous = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            assert kernels.parallel_width() == n
    finally:
        torch.set_num_threads(previous)


def test_rows_linear_is_a_linear_layer_whose_rows_keep_their_bits_at_any_row_and_thread_count(kernels):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(13, 100, generator=g), torch.randn(37, 100, generator=g)  # K and N off every block size
    whole = kernels.rows_linear(x, w)
    torch.testing.assert_close(whole, F.linear(x, w), rtol=1e-5, atol=1e-4)
    previous = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in ([0], [12], [3, 4], [0, 5, 9], [1, 2, 3, 4, 5], list(range(13))):
                assert torch.equal(kernels.rows_linear(x[rows], w), whole[rows]), (n, rows)
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.rows_linear(x.double(), w.double())
    with pytest.raises(RuntimeError, match=r"x \(R, K\)"):
        kernels.rows_linear(x, w[:, :50])


@pytest.mark.parametrize("hd, ctx, last", [(8, 9, 8), (64, 40, 39)])  # plain FMA chains; 16s in registers
def test_rows_attend_writes_the_new_key_and_value_then_attends_over_the_rows_own_positions(kernels, hd, ctx, last):
    g = torch.Generator().manual_seed(1)
    slots, H = 5, 3
    keys, values = torch.randn(slots, H, ctx, hd, generator=g), torch.randn(slots, H, ctx, hd, generator=g)
    q, k, v = (torch.randn(3, H, hd, generator=g) * 2 for _ in range(3))  # scores of a few units: exp's range
    rows, positions = torch.tensor([4, 0, 2]), torch.tensor([0, last, 5])
    before_k, before_v = keys.clone(), values.clone()
    got = kernels.rows_attend(q, k, v, keys, values, rows, positions, 0.5)
    want_k, want_v = before_k.clone(), before_v.clone()
    want_k[rows, :, positions], want_v[rows, :, positions] = k, v
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)  # only the new positions were written
    for i, (r, p) in enumerate(zip(rows.tolist(), positions.tolist())):
        w = torch.softmax((keys[r, :, :p + 1] @ q[i, :, :, None])[..., 0] * 0.5, dim=-1)  # (H, p + 1)
        torch.testing.assert_close(got[i], (w[:, :, None] * values[r, :, :p + 1]).sum(1), rtol=1e-5, atol=1e-5)
        alone = kernels.rows_attend(q[i:i + 1], k[i:i + 1], v[i:i + 1], keys, values, rows[i:i + 1],
                                    positions[i:i + 1], 0.5)
        assert torch.equal(alone, got[i:i + 1])
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.rows_attend(q, k, v, keys, values, rows, torch.tensor([0, ctx, 5]), 0.5)
    with pytest.raises(RuntimeError, match="a row twice"):
        kernels.rows_attend(q, k, v, keys, values, torch.tensor([1, 3, 1]), positions, 0.5)
    q[1, 0, 0] = float("nan")  # a NaN score gives that head NaN, as the plain pass does, and only that head
    got = kernels.rows_attend(q, k, v, keys, values, rows, positions, 0.5)
    assert got[1, 0].isnan().all() and not got[1, 1:].isnan().any() and not got[[0, 2]].isnan().any()


@pytest.mark.parametrize("layer", [torch.nn.RMSNorm(24, eps=1e-6), torch.nn.LayerNorm(24),
                                   torch.nn.LayerNorm(24, bias=False)], ids=["rms", "layer", "layer-no-bias"])
def test_rows_norm_is_the_norm_layer_and_rows_keep_their_bits(kernels, layer):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(7, 24, generator=g) * 3 + 1
        rms = isinstance(layer, torch.nn.RMSNorm)
        got = kernels.rows_norm(x, layer.weight, getattr(layer, "bias", None), layer.eps, rms)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(kernels.rows_norm(x[2:3], layer.weight, getattr(layer, "bias", None), layer.eps, rms),
                           got[2:3])


@pytest.mark.parametrize("kw", [MODERN, CLASSIC, {**CLASSIC, "mlp": "gelu"}], ids=["modern", "classic", "gelu"])
def test_the_kernel_pass_decodes_as_the_server_pass_does_and_rows_keep_their_bits(kw, kernels):
    """decode_slots against the server's plain pass (decode_rows) on prompts of several lengths,
    character by character; and kernels_exact's verdict on this machine."""
    from trainlab.chat.decoding import forget_rows_model
    from trainlab.chat.slots import SlotCache, decode_rows, decode_slots, kernels_exact, prefill_row

    model = random_model(**kw)
    g = torch.Generator().manual_seed(2)
    plain, fast = SlotCache(model.cfg, 8), SlotCache(model.cfg, 8)
    with torch.no_grad():
        for r in range(3):
            prompt = torch.randint(0, 11, (3 + 4 * r,), generator=g).tolist()
            prefill_row(model, prompt, plain, r)
            prefill_row(model, prompt, fast, r)
        for _ in range(4):
            tokens = torch.randint(0, 11, (8,), generator=g)
            want = decode_rows(model, tokens, plain, [True] * 3)[:3]
            got = decode_slots(model, kernels, tokens, fast, [0, 1, 2])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            for r in range(3):
                plain.lengths[r] += 1
                fast.lengths[r] += 1
        # the kernels hold packed copies of the weights: changed, they are made again once forgotten
        model.head.weight.mul_(-1)
        model.blocks[0].mlp.down.weight.mul_(0.5)
        forget_rows_model(model)
        tokens = torch.randint(0, 11, (8,), generator=g)
        want = decode_rows(model, tokens, plain, [True] * 3)[:3]
        torch.testing.assert_close(decode_slots(model, kernels, tokens, fast, [0, 1, 2]), want, rtol=1e-4, atol=1e-4)
    assert kernels_exact(model, kernels)


def test_a_damaged_kernels_folder_is_built_again_not_trusted(tmp_path, monkeypatch):
    """A build folder whose library does not load (damaged, half written) is wiped and built
    again once, never trusted; a second failure is one line, and the caller keeps its plain
    pass. torch's own builder stands in here (a real build takes 25-50 s), recording what it
    found in the folder each time."""
    import torch.utils.cpp_extension as cpp

    from trainlab.chat.kernels import kernels_dir, load_kernels

    folder = kernels_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / "trainlab_rows.so").write_bytes(b"not a shared library")
    seen: list[list[str]] = []

    def builder(name, cpp_sources, build_directory, **kw):
        seen.append(sorted(p.name for p in Path(build_directory).iterdir()))
        if len(seen) == 1:
            raise ImportError("trainlab_rows.so: invalid ELF header")
        return "a module"

    monkeypatch.setattr(cpp, "load_inline", builder)
    module, note = load_kernels(tmp_path)
    assert module == "a module" and note.startswith("row kernels ready")
    assert seen == [["trainlab_rows.so"], []]  # the second build started from an empty folder

    def broken(**kw):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp, "load_inline", broken)
    module, note = load_kernels(tmp_path)
    assert module is None and note == "row kernels unavailable (Ninja is required to load C++ extensions)"


def test_a_lock_left_by_a_killed_build_is_cleared_and_a_linked_folder_builds_at_its_real_path(tmp_path,
                                                                                               monkeypatch):
    """torch's builder waits while a ``lock`` file stands in the folder, and a build killed
    mid-way leaves one: every later ``chat serve`` then waited forever. And ninja keys a build by
    its command, so a folder reached through a link (the suite links its build into each runs
    folder) was built again under the other path. torch's builder stands in here."""
    import torch.utils.cpp_extension as cpp

    from trainlab.chat.kernels import kernels_dir, load_kernels

    real = kernels_dir(tmp_path / "built")
    real.mkdir(parents=True)
    (real / "lock").touch()  # what a build killed mid-way leaves
    linked = kernels_dir(tmp_path / "runs" / ".compiled")
    linked.parent.mkdir(parents=True)
    linked.symlink_to(real, target_is_directory=True)
    seen: list[tuple[str, list[str]]] = []

    def builder(name, cpp_sources, build_directory, **kw):
        seen.append((build_directory, sorted(p.name for p in Path(build_directory).iterdir())))
        return "a module"

    monkeypatch.setattr(cpp, "load_inline", builder)
    module, note = load_kernels(tmp_path / "runs" / ".compiled")
    assert module == "a module" and note.startswith("row kernels ready")
    assert seen == [(str(real.resolve()), [])]  # built where it really is, the leftover lock gone


def test_kernels_whose_openmp_build_fails_are_built_for_one_thread(tmp_path, monkeypatch):
    """A compiler whose OpenMP calls torch's library lacks fails the first build: the kernels
    are then built without OpenMP (one thread) and say so, rather than not at all."""
    import torch.utils.cpp_extension as cpp

    from trainlab.chat import kernels as k

    monkeypatch.setattr(k, "openmp_runtime", lambda: Path("/opt/torch/lib/libgomp.so.1"))
    built: list[list[str]] = []

    def builder(name, cpp_sources, build_directory, extra_cflags, extra_ldflags, **kw):
        built.append(list(extra_cflags))
        if "-fopenmp" in extra_cflags:
            raise ImportError("undefined symbol: GOMP_parallel_reductions")
        return "a module"

    monkeypatch.setattr(cpp, "load_inline", builder)
    module, note = k.load_kernels(tmp_path)
    assert module == "a module" and "one thread: the build with torch's OpenMP failed" in note
    assert built[0][-1] == "-fopenmp" and "-fopenmp" not in built[-1]


# -- a full cache: slid (rotary positions) or rebuilt (learned ones) ----------------------------------


def test_a_slid_cache_holds_the_kept_keys_turned_to_their_new_positions():
    """Layer 0's keys and values depend on each position's own character, so after a slide
    they must be what a fresh pass over the kept characters computes at their new positions:
    the check that the rotation turns them back by the dropped positions, not forward."""
    from trainlab.chat.decoding import RowCache, slides

    model = random_model(**{**MODERN, "pair_embedding": False})
    ctx = model.cfg.context_len
    tokens = torch.randint(0, 11, (ctx,), generator=torch.Generator().manual_seed(4)).tolist()
    slid, fresh = RowCache(model), RowCache(model)
    with torch.no_grad():
        slid.fill(model, tokens)
        slid.slide(model, 5)
        fresh.fill(model, tokens[5:])
    assert slides(model) and slid.length == fresh.length == ctx - 5 and slid.last == tokens[-1]
    keep = ctx - 5
    torch.testing.assert_close(slid.keys[0, :, :, :keep], fresh.keys[0, :, :, :keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slid.values[0, :, :, :keep], fresh.values[0, :, :, :keep], rtol=0, atol=0)
    # deeper layers kept what they computed with the dropped text before them: not a fresh pass
    assert not torch.allclose(slid.keys[1, :, :, :keep], fresh.keys[1, :, :, :keep], atol=1e-3)
    assert not slides(random_model(**CLASSIC))  # learned positions cannot turn: rebuilt


@pytest.mark.parametrize("kw, fills", [(MODERN, 1), (CLASSIC, None)], ids=["rotary", "learned"])
def test_generate_slides_a_rotary_cache_and_rebuilds_a_learned_one(kw, fills, monkeypatch):
    """Past the context, a rotary model's generate makes no whole pass after the prompt's; a
    learned-position model rebuilds its window every quarter of the context."""
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.decoding import RowCache
    from trainlab.chat.sampling import generate

    model = random_model(**kw)
    ctx = model.cfg.context_len
    calls = []
    real = RowCache.fill
    monkeypatch.setattr(RowCache, "fill", lambda self, m, t: calls.append(len(t)) or real(self, m, t))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=3 * ctx, stop_at="none")
    out = "".join(generate(model, [1, 2, 3], cfg, lambda i: "abcdefghijk"[i], torch.Generator().manual_seed(1)))
    assert len(out) == 3 * ctx
    if fills is not None:
        assert calls == [3]
    else:
        keep = ctx - ctx // 4
        assert calls[0] == 3 and calls[1:] and set(calls[1:]) == {keep}


def test_a_rotary_model_with_a_context_under_four_still_slides_past_it():
    """A quarter of a context of 3 is no position: the slide still drops one, so the cache
    never overflows."""
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.sampling import generate

    model = random_model(**{**MODERN, "context_len": 3})
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12, stop_at="none")
    out = "".join(generate(model, [1, 2, 3, 4], cfg, lambda i: "abcdefghijk"[i], torch.Generator().manual_seed(0)))
    assert len(out) == 12
