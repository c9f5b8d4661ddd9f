"""Bad constructor arguments fail at once with a message naming the argument."""

import pytest

from lightning_spikewatch import SpikeWatch


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"window": 4}, "window"),
        ({"window": 64.5}, "window"),
        ({"warmup": 1}, "warmup"),
        ({"window": 16, "warmup": 32}, "warmup"),
        ({"z_threshold": 0}, "z_threshold"),
        ({"z_threshold": "6"}, "z_threshold"),
        ({"min_rel_spread": -0.1}, "min_rel_spread"),
        ({"max_replays": -1}, "max_replays"),
        ({"trace_every": -2}, "trace_every"),
        ({"index_keys": "index"}, "index_keys"),
        ({"replay": "yes"}, "replay"),
        ({"batch_size_fn": 3}, "batch_size_fn"),
        ({"log_dir": 5}, "log_dir"),
        ({"action": "drop"}, "action"),
        ({"action": "skip", "act_on": ["outliers"]}, "act_on"),
        ({"action": "skip", "act_on": []}, "act_on"),
        ({"act_on": ["non_finite"]}, "act_on"),
        ({"baseline_every": 0}, "baseline_every"),
        ({"baseline_every": 2.5}, "baseline_every"),
        ({"baseline_every": True}, "baseline_every"),
    ],
)
def test_bad_argument_raises_value_error_naming_it(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}="):
        SpikeWatch(**kwargs)


def test_defaults_construct():
    watch = SpikeWatch()
    assert watch.spikes == [] and watch.z_threshold == 6.0 and watch.window == 128
