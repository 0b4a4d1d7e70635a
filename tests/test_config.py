import copy

import pytest

from helpers import REPO
from moe_compress.config import load_config, validate_config
from moe_compress.errors import ConfigError

MINIMAL = {
    "model": {"path": "demo"},
    "calibration": {},
    "variants": {"base": {"steps": []}, "p": {"method": "frequency_prune", "min_count": 3}},
}


def check(mutate) -> str:
    raw = copy.deepcopy(MINIMAL)
    mutate(raw)
    with pytest.raises(ConfigError) as error:
        validate_config(raw)
    return str(error.value)


def test_default_config_is_valid():
    config = load_config(REPO / "config" / "config.yaml")
    assert "base" in config["variants"] and config["score"]["reference"] == "base"
    assert all("steps" in variant for variant in config["variants"].values())


def test_defaults_filled_and_short_form_normalised():
    config = validate_config(MINIMAL)
    assert config["variants"]["p"] == {"steps": [{"method": "frequency_prune", "min_count": 3, "uniform": False}]}
    assert config["calibration"]["num_samples"] == 64
    assert MINIMAL["variants"]["p"] == {"method": "frequency_prune", "min_count": 3}  # input untouched


def test_misspelled_top_level_key_is_named():
    message = check(lambda c: c.update(calibraton={}))
    assert "'calibraton'" in message and "calibration" in message


def test_misspelled_step_key_is_named():
    message = check(lambda c: c["variants"]["p"].update(min_cuont=1))
    assert "variants.p.steps[0].min_cuont" in message and "min_count" in message


def test_negative_threshold_is_named():
    message = check(lambda c: c["variants"]["p"].update(min_count=-1))
    assert "variants.p.steps[0].min_count" in message and "minimum" in message


def test_wrong_type_is_named():
    message = check(lambda c: c["calibration"].update(num_samples="many"))
    assert message == "config key 'calibration.num_samples': 'many' is not an integer"


def test_unknown_method_lists_allowed():
    message = check(lambda c: c["variants"]["p"].update(method="magic_prune"))
    assert "magic_prune" in message and "frequency_prune" in message


def test_threshold_required_exactly_once():
    assert "exactly one" in check(lambda c: c["variants"]["p"].update(min_fraction=0.1))
    assert "only valid with uniform" in check(lambda c: c["variants"].update(p={"method": "frequency_prune", "keep": 3}))
