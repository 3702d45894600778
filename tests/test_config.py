"""`hlm.config`: settings out of range fail early, and configurations survive a trip through dicts."""

import pytest

from hlm.config import ConfigError, LinkConfig, PolicyConfig, RunConfig, SamplingConfig


@pytest.mark.parametrize("make", [
    lambda: PolicyConfig(k=0), lambda: PolicyConfig(gamma=-0.1), lambda: PolicyConfig(u_th=1.5),
    lambda: PolicyConfig(u_th=-0.01), lambda: PolicyConfig(name="nope"), lambda: SamplingConfig(temperature=-1),
    lambda: SamplingConfig(max_new_tokens=0), lambda: SamplingConfig(top_p=0), lambda: LinkConfig(bits_per_prob=12),
    lambda: LinkConfig(bandwidth_hz=0), lambda: LinkConfig(snr_db=float("nan")),
    lambda: RunConfig.from_dict({"policy": {"kk": 3}}),
])
def test_out_of_range_settings_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_run_config_roundtrips_through_dicts():
    cfg = RunConfig().with_policy(name="uhlm", k=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
