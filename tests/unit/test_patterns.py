"""rank_pattern / alpha_pattern from a file are hostile input: a key that is not a regex is refused naming the field,
one that backtracks catastrophically is refused within a time limit (matched in another process, the key named),
and the registry keeps each version's matched values so that serving it never runs a pattern's regex."""
import json
import random
import time

import pytest
import torch

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit import config as config_module
from lorakit.adapters import patterns
from lorakit.adapters.patterns import resolve
from lorakit.adapters.peft_files import CONFIG_NAME, fingerprint, read_adapter, validate_adapter
from lorakit.adapters.registry import Registry
from lorakit.cli.main import main
from lorakit.config import MAX_PATTERN_CHARS, match_pattern
from lorakit.models import tiny_llama
from lorakit.serve.resolve import resolve_stack
from lorakit.serve.staging import adapter_scales

EVIL = "([a-z_.0-9]+)+X"  # nested repetition: each character of a module path doubles the work of a failed match
PATHS = [f"model.layers.{i}.{m}" for i in range(4) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("key,msg", [("(", "not a valid regular expression"), ("a{2,1}", "not a valid regular"),
                                     ("x" * (MAX_PATTERN_CHARS + 1), str(MAX_PATTERN_CHARS)), ("", "non-empty")])
def test_a_key_that_is_no_pattern_is_refused_naming_the_field(field, key, msg):
    with pytest.raises(ValueError, match=msg) as e:
        LoraConfig.from_peft({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], field: {key: 2}})
    assert field in str(e.value)


def _cfg(rank_pattern=None, alpha_pattern=None):
    return LoraConfig(r=4, alpha=8, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})


@pytest.mark.parametrize("seed", range(12))
def test_resolved_values_equal_peft_first_matching_key(seed):
    """Whatever route a key set takes (literal lookup, in-process regex, the worker process), each module gets the
    value of the first key matching it, as match_pattern (PEFT's rule) gives."""
    rng = random.Random(seed)
    pool = [r"q_proj", r"self_attn\.v_proj", r"layers\.1\.mlp\.up_proj", r"1\.self_attn\.q_proj", r"proj",
            r"layers.2.self_attn.q_proj", r"q_proj|up_proj", r"layers\.[0-2]\.mlp\.up_proj", r".*v_proj",
            r"layers\.\d+\.self_attn\.q_proj"]
    if seed % 3 == 0:
        pool = [k for k in pool if patterns.LITERAL_KEY.fullmatch(k)]
    elif seed % 3 == 1:
        pool = [k for k in pool if patterns.PLAIN_KEY.fullmatch(k)]
    ranks = {k: rng.randint(1, 16) for k in rng.sample(pool, rng.randint(1, len(pool)))}
    alphas = {k: float(rng.randint(1, 64)) for k in rng.sample(pool, rng.randint(0, len(pool)))}
    cfg = _cfg(ranks, alphas)
    got = resolve(cfg, PATHS)
    assert got == {p: (match_pattern(ranks, p, 4), float(match_pattern(alphas, p, 8.0))) for p in PATHS}


def test_a_catastrophic_pattern_is_refused_within_the_time_limit_naming_its_key():
    paths = [p + ".lora_block_" + "a" * 20 for p in PATHS]  # 30+ characters: a failed match takes minutes
    cfg = _cfg({"q_proj": 2}, {"v_proj": 4.0, EVIL: 16.0})
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="did not finish") as e:
        resolve(cfg, paths, timeout=1.0)
    took = time.monotonic() - t0
    assert "alpha_pattern" in str(e.value) and repr(EVIL) in str(e.value)
    assert took < 1.0 + 5.0  # the limit, plus killing the worker (not the pattern's minutes)


def _adapter_with(tmp_path, name, **extra):
    m = tiny_llama()
    torch.manual_seed(0)
    add_adapter(m, LoraConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
    path = save_adapter(m, tmp_path / name)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text(json.dumps({**cfg, **extra}))
    return path


def test_files_with_bad_patterns_are_refused_by_the_registry_and_the_cli(tmp_path, capsys):
    reg = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    bad = _adapter_with(tmp_path, "bad", rank_pattern={"(": 8})
    with pytest.raises(ValueError, match="rank_pattern key '\\(' is not a valid regular expression"):
        reg.add("bad", bad)
    assert main(["adapters", "add", "bad", str(bad), "--registry", str(reg.path)]) == 2  # an error line, no trace
    err = capsys.readouterr().err
    assert "rank_pattern" in err and "Traceback" not in err
    assert reg.list() == []
    reg.close()


def test_the_registry_stores_the_matched_values_and_serving_runs_no_regex(tmp_path, monkeypatch):
    reg = Registry(tmp_path / "reg.sqlite", base_fp=fingerprint(tiny_llama()), base_name="tiny")
    # alpha 3 on layer 1's q_proj through a regex key (the worker process matches it), lora_alpha elsewhere
    path = _adapter_with(tmp_path, "pat", alpha_pattern={r"layers\.[1]\.self_attn\.q_proj": 3.0})
    saved = json.loads((path / CONFIG_NAME).read_text())["lora_alpha"]
    v = reg.add("pat", path)
    stored = v.config[patterns.STORED_KEY]
    assert stored["model.layers.1.self_attn.q_proj"] == [4, 3.0]
    assert stored["model.layers.0.self_attn.q_proj"] == [4, saved] and saved != 3.0

    def no_regex(*a, **k):
        raise AssertionError("a pattern's regex ran while serving")

    monkeypatch.setattr(config_module, "match_pattern", no_regex)
    monkeypatch.setattr(patterns, "_match_apart", no_regex)
    (use,), _ = resolve_stack(reg, [("pat", 1.0)])
    af = use.load()  # what the server's loader thread runs, then the slot bank on the engine thread
    validate_adapter(af, reg.base_fp)
    scales = adapter_scales(af)
    assert scales["model.layers.1.self_attn.q_proj"][2] == 3.0 / 4
    assert scales["model.layers.0.self_attn.q_proj"][2] == saved / 4
    reg.close()


def test_reading_a_file_from_elsewhere_matches_its_patterns_once(tmp_path):
    path = _adapter_with(tmp_path, "pat", rank_pattern={"q_proj": 4}, alpha_pattern={r"v_pro.": 2.0})
    af = read_adapter(path)
    assert af.config.resolved == {p: (4, 2.0 if p.endswith("v_proj") else af.config.alpha) for p in af.modules()}
