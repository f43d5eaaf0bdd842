"""SamplingParams validation and the batched Sampler.

Oracles: torch.argmax for greedy rows; a plain sorted-cumsum nucleus / top-k set computed here for the support of
filtered sampling; the true (renormalised) probabilities for empirical frequencies over many seeded draws.
"""

import math

import pytest
import torch

from dsinfer.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0, **kw) -> torch.Tensor:
    """n independent draws for one row: the row repeated n times, one generator advancing through the rows."""
    g = gen(seed)
    return Sampler()(logits_row.expand(n, -1).contiguous(), [params] * n, [g] * n, **kw)


# -- SamplingParams --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=-1), dict(temperature=100.5), dict(temperature=1e9),
    dict(top_p=0), dict(top_p=-0.5), dict(top_p=1.0001), dict(top_p=2),
    dict(top_k=-2), dict(top_k=-100),
    dict(max_tokens=0), dict(max_tokens=-1),
    dict(stop=""), dict(stop=("ok", "")), dict(stop=["", "x"]),
    dict(seed=-1), dict(seed=2**63),
    dict(temperature=float("nan")), dict(top_p=float("nan")),
], ids=repr)
def test_params_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(temperature=100), dict(temperature=1e-4), dict(top_p=1), dict(top_p=1e-6),
    dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(max_tokens=1), dict(seed=0), dict(seed=2**63 - 1),
], ids=repr)
def test_params_accept_range_edges(kwargs):
    SamplingParams(**kwargs)


def test_params_stop_normalised_to_tuple():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams().stop == ()
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


# -- greedy ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,vocab", [(1, 1), (1, 7), (5, 320), (3, 1000)])
def test_greedy_rows_are_argmax(batch, vocab):
    logits = torch.randn(batch, vocab, generator=gen(batch * vocab))
    out = Sampler()(logits, [GREEDY] * batch, [None] * batch)
    assert out.dtype == torch.int64 and out.shape == (batch,)
    assert torch.equal(out, logits.argmax(dim=-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 50.0])
def test_top_k_1_is_greedy(temperature):
    logits = torch.randn(6, 100, generator=gen(1))
    params = [SamplingParams(temperature=temperature, top_k=1)] * 6
    for seed in range(5):
        out = Sampler()(logits, params, [gen(seed + i) for i in range(6)])
        assert torch.equal(out, logits.argmax(dim=-1))


# -- reproducibility and batch invariance ----------------------------------------------------------------------

def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 200, generator=gen(2))
    params = [SamplingParams(temperature=1.5)] * 4
    runs = [Sampler()(logits, params, [gen(10 + i) for i in range(4)]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # and the draws really are random: different seeds give different tokens somewhere
    many = torch.stack([Sampler()(logits, params, [gen(100 * s + i) for i in range(4)]) for s in range(10)])
    assert len(set(many.flatten().tolist())) > 4


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20),
                                    SamplingParams(temperature=1.2, top_p=0.9)], ids=repr)
def test_row_draw_does_not_depend_on_batch_companions(params):
    row = torch.randn(1, 64, generator=gen(3))
    alone = [Sampler()(row, [params], [gen(seed)]).item() for seed in range(20)]
    companions = [
        (torch.randn(3, 64, generator=gen(4)), [GREEDY, SamplingParams(top_k=3), SamplingParams(top_p=0.5)]),
        (torch.randn(1, 64, generator=gen(5)), [SamplingParams(temperature=2.0)]),
        (torch.randn(6, 64, generator=gen(6)), [SamplingParams(temperature=0.1, top_k=2, top_p=0.3)] * 6),
    ]
    for others, other_params in companions:
        for position in (0, others.shape[0]):               # the row first, and the row last
            logits = torch.cat([others[:position], row, others[position:]])
            plist = other_params[:position] + [params] + other_params[position:]
            for seed in range(20):
                gens = [gen(1000 + j) for j in range(len(plist))]
                gens[position] = gen(seed)
                assert Sampler()(logits, plist, gens)[position].item() == alone[seed]


# -- support of filtered sampling ------------------------------------------------------------------------------

def allowed_set(logits_row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Plain reference: keep the top_k best, renormalise, then the smallest prefix (by probability) whose
    mass reaches top_p. Done in float64 with python lists."""
    probs = torch.softmax(logits_row.double() / temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k > 0:
        order = order[:top_k]
    total = sum(probs[i] for i in order)
    keep, mass = set(), 0.0
    for i in order:
        keep.add(i)
        mass += probs[i] / total
        if mass >= top_p:
            break
    return keep


@pytest.mark.parametrize("top_k", [1, 2, 5, 31])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_never_draws_outside_k_best(top_k, temperature):
    logits = torch.randn(32, generator=gen(top_k))
    draws = draw_many(logits, SamplingParams(temperature=temperature, top_k=top_k), 3000, seed=top_k)
    best = set(logits.topk(top_k).indices.tolist())
    assert set(draws.tolist()) <= best
    if top_k <= 5:                                          # with few allowed tokens, every one shows up
        assert set(draws.tolist()) == best


@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 0), (3.0, -1), (1.0, 10)])
def test_top_p_never_draws_outside_nucleus(top_p, temperature, top_k):
    logits = torch.randn(40, generator=gen(7)) * 2
    keep = allowed_set(logits, temperature, top_k, top_p)
    draws = draw_many(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), 3000, seed=11)
    assert set(draws.tolist()) <= keep
    if len(keep) <= 4:
        assert set(draws.tolist()) == keep


@pytest.mark.parametrize("logits,params,expected", [
    ([math.log(0.3), math.log(0.7)], SamplingParams(temperature=1.0), [0.3, 0.7]),
    ([math.log(0.1), math.log(0.9)], SamplingParams(temperature=1.0), [0.1, 0.9]),
    ([0.0, 1.0], SamplingParams(temperature=2.0), [1 / (1 + math.e ** 0.5), 1 - 1 / (1 + math.e ** 0.5)]),
    ([math.log(0.3), math.log(0.7)], SamplingParams(temperature=1.0, top_p=0.5), [0.0, 1.0]),
    ([math.log(0.3), math.log(0.7)], SamplingParams(temperature=1.0, top_p=0.71), [0.3, 0.7]),
    ([math.log(0.2), math.log(0.3), math.log(0.5)], SamplingParams(temperature=1.0, top_k=2), [0.0, 0.375, 0.625]),
    ([math.log(0.3), math.log(0.7)], SamplingParams(temperature=1.0, top_k=5, top_p=0.9), [0.3, 0.7]),
], ids=["0.3/0.7", "0.1/0.9", "temperature-2", "top_p-cuts-to-1", "top_p-keeps-2", "top_k-renormalises",
        "top_k-beyond-vocab"])
def test_empirical_frequencies_match_probabilities(logits, params, expected):
    n = 20000
    draws = draw_many(torch.tensor(logits), params, n, seed=1234)
    freq = torch.bincount(draws, minlength=len(logits)).double() / n
    # sd of a frequency is at most sqrt(0.25 / n) = 0.0035; 0.02 is > 5 sd
    assert torch.allclose(freq, torch.tensor(expected, dtype=torch.double), atol=0.02), freq


# -- vocab_limit -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=1.0), SamplingParams(temperature=100.0),
                                    SamplingParams(top_k=3), SamplingParams(top_p=0.5)], ids=repr)
@pytest.mark.parametrize("limit", [1, 10, 63])
def test_vocab_limit_never_exceeded(params, limit):
    logits = torch.randn(64, generator=gen(limit))
    logits[limit:] += 20.0                      # the padded tail holds the best logits by far
    draws = draw_many(logits, params, 2000, seed=limit, vocab_limit=limit)
    assert draws.max().item() < limit
    if params.greedy:
        assert (draws == logits[:limit].argmax()).all()
    if limit == 1:
        assert (draws == 0).all()


def test_vocab_limit_at_or_beyond_vocab_is_no_op():
    logits = torch.randn(3, 16, generator=gen(8))
    for limit in (16, 100, None):
        assert torch.equal(Sampler()(logits, [GREEDY] * 3, [None] * 3, vocab_limit=limit), logits.argmax(-1))


# -- mixed batch -----------------------------------------------------------------------------------------------

def test_mixed_batch_greedy_and_sampled_rows():
    logits = torch.randn(6, 50, generator=gen(9))
    params = [GREEDY, SamplingParams(temperature=1.0), GREEDY, SamplingParams(temperature=0.8, top_k=4),
              SamplingParams(temperature=1.0, top_p=0.6), GREEDY]
    sampled_rows = [1, 3, 4]
    seen = {i: set() for i in sampled_rows}
    for seed in range(200):
        gens = [gen(seed * 10 + i) for i in range(6)]
        out = Sampler()(logits, params, gens)
        for i in (0, 2, 5):
            assert out[i].item() == logits[i].argmax().item()
        for i in sampled_rows:
            p = params[i]
            assert out[i].item() in allowed_set(logits[i], p.temperature, p.top_k, p.top_p)
            # the same row sampled alone with the same seed draws the same token
            assert Sampler()(logits[i:i + 1], [p], [gen(seed * 10 + i)]).item() == out[i].item()
            seen[i].add(out[i].item())
    assert len(seen[1]) > 5 and len(seen[3]) > 1          # the sampled rows really sample
