import numpy as np
import pytest
import torch

from trainlab.config import ConfigError
from trainlab.multiply.config import BOS, DIGIT0, EOS, PAD, SPLITS, TIMES, TOKENS, MultiplyDataConfig
from trainlab.multiply.data import MultiplicationDataset, decode_answer, digit_count, encode_pairs, split_ids


def ds(lo=1, hi=3, **kw):
    return MultiplicationDataset(MultiplyDataConfig(min_digits=lo, max_digits=hi, **kw))


def test_counts_of_digit_ranges():
    assert len(ds(1, 1)) == 81
    assert len(ds(2, 2)) == 90 * 90
    assert len(ds(1, 3)) == 999 * 999
    counts = ds(1, 3).split_counts()
    assert sum(counts.values()) == 999 * 999
    # the hash split follows the asked fractions closely on a million problems
    assert abs(counts["val"] / 998001 - 0.01) < 0.001
    assert abs(counts["test"] / 998001 - 0.02) < 0.001


def test_splits_are_disjoint_and_cover_everything():
    d = ds(1, 2)
    seen = np.concatenate([np.concatenate(list(d.iter_split(s))) for s in SPLITS])
    assert len(seen) == len(d) and len(np.unique(seen)) == len(d)


def test_split_of_a_pair_does_not_depend_on_the_range_or_seed():
    small, big = ds(2, 2), ds(1, 3)
    idx = np.arange(len(small))
    a, b = small.pairs(idx)
    big_idx = (a - big.lo) * big.width + (b - big.lo)
    assert np.array_equal(small.split_of(idx), big.split_of(big_idx))


def test_sample_draws_only_from_the_requested_split():
    d = ds(1, 3)
    for split in SPLITS:
        idx = d.sample(split, 500, np.random.default_rng(1))
        assert len(idx) == 500
        assert (d.split_of(idx) == SPLITS.index(split)).all()


def test_sample_and_subset_are_deterministic():
    d = ds(1, 3)
    assert np.array_equal(d.sample("train", 64, np.random.default_rng([3, 7])),
                          d.sample("train", 64, np.random.default_rng([3, 7])))
    s1, s2 = d.subset("val", 300, seed=0), d.subset("val", 300, seed=0)
    assert np.array_equal(s1, s2) and len(np.unique(s1)) == 300


def test_class_power_reweights_operand_length_classes_within_the_split():
    d = ds(1, 2, class_power=0.0)  # classes 1x1 (81 problems), 1x2 and 2x1 (810 each), 2x2 (8100)
    rng = np.random.default_rng(5)
    even = d.sample("train", 40000, rng, by_class=True)
    assert (d.split_of(even) == 0).all()
    a, b = d.pairs(even)
    share = {(x, y): np.mean((digit_count(a) == x) & (digit_count(b) == y)) for x in (1, 2) for y in (1, 2)}
    assert all(abs(v - 0.25) < 0.015 for v in share.values()), share
    # within a class, every problem is equally likely: the 1x1 class is covered evenly
    small = (digit_count(a) == 1) & (digit_count(b) == 1)
    counts = np.unique(even[small], return_counts=True)[1]
    one_by_one = np.array([(x - d.lo) * d.width + (y - d.lo) for x in range(1, 10) for y in range(1, 10)])
    assert len(counts) == (d.split_of(one_by_one) == 0).sum() and counts.min() > 0.5 * counts.mean()
    # power 1, the default, is the plain uniform draw (the random stream runs were made with)
    plain = d.sample("train", 4000, np.random.default_rng(9))
    assert np.array_equal(plain, ds(1, 2).sample("train", 4000, np.random.default_rng(9), by_class=True))
    pa, pb = d.pairs(plain)
    assert abs(np.mean((digit_count(pa) == 2) & (digit_count(pb) == 2)) - 8100 / 9801) < 0.02
    # in between: size ** 0.5, so 1x1 gets 9 / (9 + 2 * sqrt(810) + 90) of the draws
    half = d.pairs(ds(1, 2, class_power=0.5).sample("train", 40000, np.random.default_rng(2), by_class=True))
    expected = 9 / (9 + 2 * 810**0.5 + 90)
    assert abs(np.mean((digit_count(half[0]) == 1) & (digit_count(half[1]) == 1)) - expected) < 0.01


def test_special_tokens_never_share_an_id_with_a_digit():
    digits = {DIGIT0 + k for k in range(10)}
    assert not digits & {PAD, BOS, EOS, TIMES}
    assert len({PAD, BOS, EOS, TIMES}) == 4
    assert [TOKENS[DIGIT0 + k] for k in range(10)] == [str(k) for k in range(10)]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("order", ["reversed", "natural"])
def test_tokens_round_trip(order, pad):
    a = torch.tensor([1, 9, 12, 100, 999, 10, 345])
    b = torch.tensor([1, 9, 345, 100, 999, 10, 12])
    enc = encode_pairs(a, b, 3, order, pad)
    for i in range(len(a)):
        assert decode_answer(enc["tgt_out"][i], order) == int(a[i] * b[i])
        # the decoder input is the target shifted right behind <bos>
        assert enc["tgt_in"][i, 0] == BOS
        assert torch.equal(enc["tgt_in"][i, 1:], enc["tgt_out"][i, :-1])


def test_source_is_zero_padded_and_answer_reversed():
    enc = encode_pairs(torch.tensor([12]), torch.tensor([345]), 3, "reversed")
    src = [TOKENS[t] for t in enc["src"][0]]
    assert src == ["0", "1", "2", "*", "3", "4", "5"]
    out = [TOKENS[t] for t in enc["tgt_out"][0]]
    assert out == ["0", "4", "1", "4", "<eos>", "<pad>", "<pad>"]  # 4140 least significant first
    nat = [TOKENS[t] for t in encode_pairs(torch.tensor([12]), torch.tensor([345]), 3, "natural")["tgt_out"][0]]
    assert nat[:5] == ["4", "1", "4", "0", "<eos>"]


def test_padded_answers_have_one_width_and_fixed_place_values():
    enc = encode_pairs(torch.tensor([12, 999, 1]), torch.tensor([345, 999, 7]), 3, "natural", answer_pad=True)
    rows = [" ".join(TOKENS[t] for t in r) for r in enc["tgt_out"]]
    assert rows == ["0 0 4 1 4 0 <eos>", "9 9 8 0 0 1 <eos>", "0 0 0 0 0 7 <eos>"]
    rev = encode_pairs(torch.tensor([12]), torch.tensor([345]), 3, "reversed", answer_pad=True)["tgt_out"][0]
    assert " ".join(TOKENS[t] for t in rev) == "0 4 1 4 0 0 <eos>"
    assert decode_answer(rev, "reversed") == 4140


def test_decode_answer_rejects_malformed_output():
    assert decode_answer([DIGIT0 + 1, DIGIT0 + 2], "natural") is None  # no <eos>
    assert decode_answer([EOS], "natural") is None  # no digits
    assert decode_answer([DIGIT0 + 1, TIMES, EOS], "natural") is None


def test_split_ids_are_pure():
    a, b = np.array([7, 8, 123]), np.array([8, 7, 456])
    assert np.array_equal(split_ids(a, b, 0.1, 0.1), split_ids(a, b, 0.1, 0.1))


@pytest.mark.parametrize("kw, field", [
    (dict(min_digits=3, max_digits=2), "min_digits"),
    (dict(min_digits=0, max_digits=2), "min_digits"),
    (dict(min_digits=1, max_digits=12), "max_digits"),
    (dict(answer_order="sideways"), "answer_order"),
    (dict(val_fraction=0.6, test_fraction=0.5), "val_fraction"),
    (dict(class_power=1.5), "class_power"),
    (dict(class_power=-0.1), "class_power"),
])
def test_bad_data_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        MultiplyDataConfig(**kw)
    assert e.value.field == field
    assert str(e.value).startswith("--" + field.replace("_", "-"))
