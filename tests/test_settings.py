import json

import pytest

from hf_performer import PerformerConfig


def test_defaults_round_trip_through_json():
    cfg = PerformerConfig(nb_features=64, kernel="favor++", orthogonal=False, seed=7, extra={"note": "x"})
    again = PerformerConfig.from_json_string(cfg.to_json_string())
    assert again == cfg
    assert PerformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "field,value",
    [
        ("nb_features", 0),
        ("nb_features", 2.5),
        ("kernel", "gaussian"),
        ("feature_norm", "unit"),
        ("redraw_interval", -1),
        ("seed", -3),
        ("chunk_size", 0),
        ("eps", 0.0),
        ("eps", 2.0),
        ("orthogonal", "yes"),
        ("center_keys", 1),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PerformerConfig\.{field}="):
        PerformerConfig(**{field: value})


def test_trig_needs_even_features():
    with pytest.raises(ValueError, match="nb_features"):
        PerformerConfig(kernel="trig", nb_features=7)


def test_unknown_field_lists_accepted_ones():
    with pytest.raises(ValueError, match="unknown field.*nb_featurez"):
        PerformerConfig.from_dict({"nb_featurez": 3})


@pytest.mark.parametrize("kernel", ["softmax", "favor++", "relu", "trig"])
def test_estimator_names_what_runs(kernel):
    """Aligned features replace only positive kernels, and only once the statistics are calibrated."""
    cfg = PerformerConfig(kernel=kernel)
    aligned = kernel in ("softmax", "favor++")
    assert cfg.estimator(statistics_calibrated=True) == ("aligned-softmax" if aligned else kernel)
    assert cfg.estimator(statistics_calibrated=False) == kernel
    assert cfg.estimator(statistics_calibrated=False, causal=True) == ("softmax" if kernel == "favor++" else kernel)
    assert PerformerConfig(kernel=kernel, aligned_features=False).estimator(statistics_calibrated=True) == kernel
    assert "estimator" not in cfg.to_dict()  # derived, never stored: config.json round trips as before
