"""SVD analysis of a weight change: energies on known spectra, and a planted rank-2 change is found as rank 2."""
import copy
import math

import pytest
import torch

from lorakit.lab.analysis import analyze, energy_at, random_energy, rank_for, weight_deltas


def test_energy_and_rank_on_a_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    e = energy_at(s, [1, 2, 3, 8])
    assert e[1] == pytest.approx(9 / 14) and e[2] == pytest.approx(13 / 14) and e[3] == pytest.approx(1.0)
    assert e[8] == pytest.approx(1.0)  # ranks beyond the matrix keep everything
    assert rank_for(s, 0.5) == 1 and rank_for(s, 0.9) == 2 and rank_for(s, 0.99) == 3


def test_random_matrix_energy_is_spread_out():
    e = random_energy((256, 256), [8, 128, 256])
    assert 8 / 256 < e[8] < 4 * 8 / 256  # no low-rank structure: ~r/n, a little more at the top
    assert 0.5 < e[128] < 0.95 and e[256] == pytest.approx(1.0)


def test_planted_rank_two_change_is_found(tiny):
    tuned = copy.deepcopy(tiny)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, w in [(p, m.weight) for p, m in tuned.named_modules() if isinstance(m, torch.nn.Linear)]:
            if ".layers." not in path:
                continue
            out_f, in_f = w.shape
            u, v = torch.randn(out_f, 2, generator=g), torch.randn(2, in_f, generator=g)
            w += 0.01 * (u * torch.tensor([1.0, 0.5])) @ v  # rank 2, second direction weaker
    deltas = weight_deltas(tuned, tiny)
    assert len(deltas) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down; lm_head excluded
    res = analyze(tuned, tiny, [1, 2, 4])
    for m in res["modules"]:
        assert m["energy"][1] == pytest.approx(1.0, abs=1e-5)  # all of it in 2 directions
        assert 0.5 < m["energy"][0] < 1.0
        assert m["r90"] <= 2 and m["r99"] <= 2
        assert 0 < m["rel_change"] < 1
    w = dict(tiny.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    q0 = next(m for m in res["modules"] if m["module"] == "model.layers.0.self_attn.q_proj")
    d = deltas["model.layers.0.self_attn.q_proj"]
    assert q0["rel_change"] == pytest.approx(float(d.norm() / w.norm()), rel=1e-5)
    assert set(res["kinds"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert res["overall"][1] == pytest.approx(1.0, abs=1e-5)
    assert res["kinds"]["q_proj"]["random_energy"][0] < 0.5  # the reference has no such structure
    assert all(math.isfinite(x) for x in res["overall"])


def test_models_with_different_layers_are_refused(tiny):
    from lorakit.models import tiny_llama

    with pytest.raises(ValueError, match="different linear layers"):
        weight_deltas(tiny, tiny_llama(layers=3))


def test_svd_energy_plot_draws_each_random_reference_in_its_own_style(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from lorakit.lab.plots import svd_energy

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    ranks = [1, 2, 4]
    kinds = {k: {"shape": s, "energy": [0.5, 0.7, 0.9], "random_energy": [0.1, 0.2, 0.4], "r90": 3.0,
                 "rel_change": 1e-3} for k, s in (("q_proj", [576, 576]), ("k_proj", [192, 576]),
                                                   ("up_proj", [1536, 576]))}
    svd_energy({"ranks": ranks, "kinds": kinds, "overall": [0.5, 0.7, 0.9]}, [], tmp_path / "e.png")
    grey = [ln for ln in saved[0].axes[0].get_lines() if ln.get_label().startswith("random")]
    assert len(grey) == 3
    assert len({(str(ln.get_linestyle()), ln.get_marker()) for ln in grey}) == 3
