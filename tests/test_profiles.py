"""Device profiles and link presets: the registry, the CLI and sweep flags, labels on every energy part, the summary's
link-energy figure and the record of the choice (tiny pair only)."""

import json
from dataclasses import replace

import pytest

from hlm.cli import build_parser, main, run_config
from hlm.cli.sweep import apply_preset, base_config
from hlm.config import (
    DEVICE_PROFILES,
    LINK_PRESETS,
    ConfigError,
    DeviceProfile,
    LinkConfig,
    RunConfig,
    SamplingConfig,
    catalogue,
    device_profile,
    link_label,
    link_preset,
)
from hlm.events import ENERGY_PARTS

PHONE = device_profile("phone")


def test_registry_entries_are_documented_and_valid():
    assert set(DEVICE_PROFILES) == {"this-machine", "phone"}
    assert set(LINK_PRESETS) == {"default", "paper-like", "cell-edge", "good-5g"}
    for choice in (*DEVICE_PROFILES.values(), *LINK_PRESETS.values()):
        assert choice.label and len(choice.description) > 80
    assert device_profile("this-machine") == DeviceProfile() and not DeviceProfile().modelled
    assert PHONE.modelled and PHONE.slm_energy_per_token_j == 0.44 and PHONE.slm_time_per_token_s == 1 / 50.45
    assert "2603.26603" in PHONE.source and "2603.26603" in DEVICE_PROFILES["phone"].description
    assert link_preset("default") == LinkConfig()
    rates = {name: link_preset(name).uplink_rate_bps for name in LINK_PRESETS}
    assert 0.07e6 <= rates["paper-like"] <= 0.15e6  # research/ENERGY.md: the paper's implied uplink
    assert rates["cell-edge"] == pytest.approx(1.5e6, rel=0.01)  # 0.15 bit/s/Hz over 10 MHz
    assert rates["paper-like"] < rates["cell-edge"] < rates["default"] < rates["good-5g"]
    listed = catalogue()
    assert [d["name"] for d in listed["device_profiles"]] == list(DEVICE_PROFILES)
    assert [p["name"] for p in listed["link_presets"]] == list(LINK_PRESETS)
    assert all({"label", "description", "uplink_rate_bps", "bandwidth_hz"} <= set(p) for p in listed["link_presets"])
    json.dumps(listed)  # a view can send it as is


@pytest.mark.parametrize("make,message", [
    (lambda: device_profile("tablet"), "unknown device profile 'tablet'; choose one of this-machine, phone"),
    (lambda: link_preset("wifi"), "unknown link preset 'wifi'; choose one of default, paper-like"),
    (lambda: RunConfig(link_preset="wifi"), "unknown link preset"),
    (lambda: DeviceProfile("x", slm_time_per_token_s=0.01), "given together"),
    (lambda: DeviceProfile("x", 0.01, -1.0, "someone"), "slm_energy_per_token_j must be"),
    (lambda: DeviceProfile("x", 0.01, 0.1), "cite its source"),
    (lambda: RunConfig.from_dict({"device": {"watts": 3}}), "unknown device field"),
])
def test_bad_profiles_and_presets_are_refused(make, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make()


def test_link_label_names_the_overridden_fields():
    assert link_label("paper-like", link_preset("paper-like")) == "paper-like"
    assert link_label("paper-like", replace(link_preset("paper-like"), snr_db=0.0, rtt_s=0.1)) == \
        "paper-like + snr_db, rtt_s"


def test_config_round_trips_with_profile_and_preset():
    cfg = RunConfig(link=replace(link_preset("cell-edge"), tx_power_w=2.0), device=PHONE, link_preset="cell-edge")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["device"]["name"] == "phone" and data["link_preset"] == "cell-edge"
    assert RunConfig.from_dict(data) == cfg
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()


def parse(*flags: str, command: str = "generate") -> RunConfig:
    if command == "generate":
        return run_config(build_parser().parse_args([command, "--prompt", "hi", *flags]))
    return base_config(apply_preset(build_parser().parse_args([command, "--out", "unused", "--quick", *flags])))


@pytest.mark.parametrize("command", ["generate", "sweep"])
def test_cli_flags_pick_and_override(command):
    default = parse(command=command)
    assert default.device == DeviceProfile() and default.link == LinkConfig() and default.link_preset == "default"
    cfg = parse("--device-profile", "phone", "--link-preset", "paper-like", "--snr-db", "0", "--rtt-s", "0.1",
                command=command)
    assert cfg.device == PHONE and cfg.link_preset == "paper-like"
    assert cfg.link == replace(link_preset("paper-like"), snr_db=0.0, rtt_s=0.1)  # flags override, rest from preset
    assert parse("--bandwidth-hz", "1e6", command=command).link == LinkConfig(bandwidth_hz=1e6)


@pytest.mark.parametrize("flags,message", [
    (["--device-profile", "tablet"], "error: unknown device profile 'tablet'"),
    (["--link-preset", "wifi"], "error: unknown link preset 'wifi'"),
])
def test_cli_bad_names_exit_2_with_one_line(flags, message, capsys):
    assert main(["generate", "--models", "tiny", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def run(decoder, device: DeviceProfile, preset: str = "paper-like", policy: str = "random", n: int = 12) -> dict:
    cfg = RunConfig(SamplingConfig(max_new_tokens=n, stop_at_eos=False), link=link_preset(preset), device=device,
                    link_preset=preset).with_policy(name=policy, skip_rate=0.5)
    _, events, summary = decoder.run("hello there", cfg)
    return {"events": events, "summary": summary}


def test_phone_profile_prices_every_drafted_token_from_the_source(decoder):
    out = run(decoder, PHONE)
    events, s = out["events"], out["summary"]
    assert 0 < s["uploads"] < s["tokens"] == 12  # both kinds of token: kept locally and uploaded
    for e in events:
        assert e.energy_j["device_compute"] == 0.44 and e.draft_s == 1 / 50.45
        assert e.energy_method["device_compute"] == "modelled"
    assert s["device_energy_parts_j"]["device_compute"] == pytest.approx(12 * 0.44)
    assert s["device_compute_s"] == pytest.approx(12 / 50.45)
    assert s["energy_methods"]["device_compute"].startswith("modelled: phone (Ehsani et al. 2026, arXiv 2603.26603")
    assert s["device_profile"] == "phone" and s["link_preset"] == "paper-like"


@pytest.mark.parametrize("device", [DeviceProfile(), PHONE], ids=["this-machine", "phone"])
@pytest.mark.parametrize("policy", ["ours", "llm"])
def test_every_energy_part_is_labelled_and_link_energy_is_radio_plus_idle(decoder, device, policy):
    s = run(decoder, device, policy=policy)["summary"]
    assert set(s["energy_methods"]) == set(ENERGY_PARTS)
    assert all(label.startswith(("measured: ", "modelled: ")) for label in s["energy_methods"].values())
    parts = s["device_energy_parts_j"]
    assert s["link_energy_j"] == pytest.approx(parts["radio"] + parts["device_idle"])
    assert s["device_energy_j"] == pytest.approx(s["link_energy_j"] + parts["device_compute"])
    if policy == "llm":  # the device drafts nothing under any profile
        assert parts["device_compute"] == 0.0 and s["link_energy_j"] > 0


def test_cli_json_records_the_choice(capsys):
    assert main(["generate", "--models", "tiny", "--prompt", "hello", "--max-new-tokens", "6", "--policy", "hlm",
                 "--device-profile", "phone", "--link-preset", "cell-edge", "--tx-power-w", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s = data["summary"]
    assert s["device_profile"] == "phone" and s["link_preset"] == "cell-edge + tx_power_w"
    assert s["link_energy_j"] == pytest.approx(s["device_energy_parts_j"]["radio"]
                                               + s["device_energy_parts_j"]["device_idle"])
    config = RunConfig.from_dict(data["config"])
    assert config.device == PHONE and config.link == replace(link_preset("cell-edge"), tx_power_w=2.0)
