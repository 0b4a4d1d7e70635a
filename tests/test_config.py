import copy

import pytest

from helpers import REPO
from moe_compress.config import (
    describe_config_files,
    load_config,
    load_schema,
    validate_config,
)
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


# ---- a config names the whole experiment -------------------------------------------------------------------

def test_a_config_of_model_and_variants_alone_takes_the_schema_defaults():
    config = validate_config({"model": {"path": "demo"}, "variants": {"base": {"steps": []}}})
    schema = load_schema()["properties"]
    assert config["calibration"]["path"] == schema["calibration"]["properties"]["path"]["default"]
    assert config["evaluation"]["tasks"] == schema["evaluation"]["properties"]["tasks"]["default"]
    assert list(config["variants"]) == ["base"]


def test_a_config_without_variants_is_refused_saying_what_a_config_holds():
    message = check(lambda raw: raw.pop("variants"))
    assert message.startswith("config key 'variants': missing, and required (a config names the whole experiment")


def test_a_run_says_which_config_files_it_reads(tmp_path):
    mine = tmp_path / "mine.yaml"
    assert describe_config_files([]) == ("moe-compress: config from config/config.yaml (the demo); --configfile FILE "
                                         "runs your own experiment instead")
    assert describe_config_files([mine, tmp_path / "more.yaml"], overrides=True) == (
        f"moe-compress: config from {mine}, {tmp_path / 'more.yaml'} merged in this order; --config values on top; "
        f"config/config.yaml (the demo) is not read, keys not set take the schema's defaults")



def test_every_method_has_a_record_and_a_schema_entry():
    """The contract of adding a method: its module's Method record (with its ``inspect`` line) and its schema
    entry, both. A method on one side only fails here, not as a KeyError in a job."""
    from moe_compress.config import load_schema
    from moe_compress.methods.registry import method, methods, registry_schema_problems

    in_schema = set(load_schema()["$defs"]["methods"])
    assert registry_schema_problems(set(methods()), in_schema) == []
    # the check itself, on each side missing one
    assert registry_schema_problems({"a", "b"}, {"a"}) == ["b: a Method record but no schema entry ($defs.methods)"]
    assert registry_schema_problems({"a"}, {"a", "c"}) == ["c: a schema entry ($defs.methods) but no Method record"]
    with pytest.raises(ConfigError, match=r"method 'no_such_prune' has no Method record \(registered: .*reap_prune"):
        method("no_such_prune")
    # `moe-compress inspect` prints each method's line from its record
    assert [name for name, record in methods().items() if not callable(record.inspect)] == []


@pytest.mark.parametrize("study", sorted((REPO / "config" / "studies").glob("*.yaml")), ids=lambda path: path.stem)
def test_every_study_validates_against_the_demo_model(study):
    from moe_compress.config import check_variants_against_model, read_config_file

    config = validate_config(read_config_file(study))
    demo = config["demo_model"]
    assert config["model"]["path"] == "demo"
    check_variants_against_model(config["variants"], num_experts=demo["num_experts"], top_k=demo["top_k"],
                                 num_layers=demo["num_layers"])
