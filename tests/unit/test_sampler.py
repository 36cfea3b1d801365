"""Sampling on the device (serve/sampler.py): frequencies follow softmax(logits / temperature) cut to the top-p
nucleus, greedy rows take the argmax, and a row's draws depend on its seed and step only."""
import torch

from lorakit.serve.sampler import choose, uniforms

N = 40000


def _freq(logits, temperature, top_p):
    n = N
    tok = choose(logits.repeat(n, 1), torch.full((n,), temperature), torch.full((n,), top_p),
                 torch.arange(n) * 7919 + 3, torch.zeros(n, dtype=torch.long))
    return torch.bincount(tok, minlength=logits.shape[1]).double() / n


def _within(freq, p):
    sd = (p * (1 - p) / N).sqrt()  # binomial standard deviation of each frequency
    assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq, p)


def test_frequencies_follow_temperature_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    for t in (1.0, 0.5, 2.0):
        _within(_freq(logits, t, 1.0), torch.softmax(logits[0].double() / t, 0))
    p = torch.softmax(logits[0].double(), 0)  # 0.61, 0.22, 0.14, ...: top_p 0.8 keeps the first two, then three
    keep = (p.cumsum(0) - p) < 0.8
    _within(_freq(logits, 1.0, 0.8), p * keep / (p * keep).sum())


def test_greedy_rows_and_seeds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    temp = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    seeds = torch.tensor([1, 2, 3, 2, 2, 9])
    steps = torch.tensor([0, 4, 0, 4, 5, 4])
    tok = choose(logits, temp, torch.ones(6), seeds, steps)
    assert tok[0] == logits[0].argmax() and tok[2] == logits[2].argmax()
    same = choose(logits[[1, 1]], temp[[1, 3]], torch.ones(2), seeds[[1, 3]], steps[[1, 3]])
    assert same[0] == same[1]  # same logits, seed and step: the same token, wherever the row sits
    u = uniforms(seeds, steps, 50)
    assert torch.equal(u[1], u[3]) and not torch.equal(u[1], u[4]) and not torch.equal(u[1], u[5])
    assert float(u.min()) > 0 and float(u.max()) < 1
