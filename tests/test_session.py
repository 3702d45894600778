"""`hlm.session`, the front ends' one door: the u_th rule (resolved once, its source in every summary) and the
run builder from plain values."""

import json
from dataclasses import replace

import pytest

from hlm.cli import main
from hlm.config import ConfigError, LinkConfig, PolicyConfig, RunConfig, link_preset
from hlm.dashboard import Settings
from hlm.models import Calibration
from hlm.session import resolve_u_th, run_config, with_u_th

CAL = Calibration(a=0.8, b=-0.1, delta=0.2, risk_averse=0.125, risk_prone=0.375, samples=10)


def test_u_th_is_given_else_calibrated_else_the_default():
    assert resolve_u_th(0.3, CAL) == (0.3, "given")
    assert resolve_u_th(0.0, CAL) == (0.0, "given")  # 0 is a value, not "unset"
    assert resolve_u_th(None, CAL) == (0.125, "calibrated")
    assert resolve_u_th(None, None) == (PolicyConfig.u_th, "default")


def test_the_source_is_provenance_not_a_setting():
    config = with_u_th(RunConfig(), None, CAL)
    assert config.policy.u_th == 0.125 and config.u_th_source == "calibrated"
    assert config == RunConfig().with_policy(u_th=0.125)  # equal settings, whatever their origin
    assert "u_th_source" not in config.to_dict()  # cache keys of the experiments are unchanged
    with pytest.raises(ConfigError, match="u_th must be"):
        with_u_th(RunConfig(), 1.5, CAL)


def test_run_config_from_plain_values():
    config = run_config(policy="ours", k=8, link="paper-like", link_overrides={"snr_db": 0.0, "rtt_s": None},
                        device="phone", calibration=CAL)
    assert config.policy.name == "ours" and config.policy.k == 8 and config.policy.u_th == 0.125
    assert config.link == replace(link_preset("paper-like"), snr_db=0.0) and config.link_preset == "paper-like"
    assert config.device.name == "phone" and config.u_th_source == "calibrated"
    assert run_config() == RunConfig() and run_config().link == LinkConfig()


def test_dashboard_settings_follow_the_same_rule():
    assert Settings().run_config(CAL).u_th_source == "calibrated"
    assert Settings(u_th=0.3).run_config(CAL).u_th_source == "given"
    assert Settings().run_config(None).u_th_source == "default"


@pytest.mark.parametrize("flags,source", [([], "default"), (["--u-th", "0.2"], "given")])
def test_every_summary_says_where_its_u_th_came_from(flags, source, capsys):
    assert main(["generate", "--models", "tiny", "--prompt", "hi", "--max-new-tokens", "4", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["u_th_source"] == source
