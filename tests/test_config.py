"""Config loading: types are checked, unknown keys rejected, dotted overrides applied."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from selfdistill.config import apply_overrides, from_dict, load_config, opt, to_dict
from selfdistill.errors import UserError


@dataclass(frozen=True)
class Inner:
    rank: int = opt(8, "LoRA rank")
    modules: list[str] = opt(["q_proj"], "targets")


@dataclass(frozen=True)
class Outer:
    name: str = opt("x", "a name")
    lr: float = opt(1e-4, "learning rate")
    limit: int | None = opt(None, "rows")
    flag: bool = opt(False, "a switch")
    grid: list[float] = opt([0.5], "t values")
    inner: Inner = opt(Inner(), "a section")

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError("lr must be positive")


def test_types_are_checked_and_ints_widen_to_float():
    cfg = from_dict(Outer, {"lr": 1, "limit": 3, "grid": [0, 1], "inner": {"rank": 4}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.grid == [0.0, 1.0] and cfg.inner.rank == 4


def test_exponent_without_a_dot_is_a_float_in_yaml_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 5e-5\n")  # PyYAML (YAML 1.1) hands this over as the string '5e-5'
    assert load_config(Outer, path).lr == 5e-5
    assert load_config(Outer, None, ["lr=2E-4"]).lr == 2e-4
    assert from_dict(Outer, {"lr": "3e-4"}).lr == 3e-4  # what argparse gives for --learning-rate 3e-4


@pytest.mark.parametrize(("data", "message"), [
    ({"lr": "fast"}, "config key 'lr'"),
    ({"nmae": "typo"}, "unknown config key 'nmae'"),
    ({"inner": {"rnak": 1}}, "unknown config key 'inner.rnak'"),
    ({"limit": "many"}, "config key 'limit'"),
    ({"flag": "yes"}, "expected true/false"),
    ({"inner": {"rank": 2.5}}, "config key 'inner.rank'"),
    ({"lr": -1.0}, "lr must be positive"),
])
def test_bad_config_is_rejected_with_the_key(data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        from_dict(Outer, data)


def test_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ninner:\n  rank: 16\n")
    cfg = load_config(Outer, path, ["inner.rank=32", "grid=[0.25,0.75]", "flag=true"])
    assert (cfg.name, cfg.inner.rank, cfg.grid, cfg.flag) == ("demo", 32, [0.25, 0.75], True)
    assert to_dict(cfg)["inner"] == {"rank": 32, "modules": ["q_proj"]}


def test_comma_separated_list_from_a_flag():
    assert from_dict(Outer, {"grid": "0.25,0.5"}).grid == [0.25, 0.5]
    assert from_dict(Outer, {"grid": ["0.25,0.5", "0.75"]}).grid == [0.25, 0.5, 0.75]  # argparse's shape


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: a\n  lr: [\n")
    with pytest.raises(UserError, match="bad.yaml:"):
        load_config(Outer, path)


def test_override_needs_key_value():
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["justakey"])


@dataclass(frozen=True)
class Stage:
    rank: int = opt(8, "a setting that changes the result")
    overwrite: bool = opt(False, "how to treat an existing output", keyed=False)


def test_stage_keys_hold_every_setting_but_the_unkeyed_ones():
    from selfdistill.stages import key_config

    assert key_config(Stage()) == {"rank": 8} and to_dict(Stage()) == {"rank": 8, "overwrite": False}
    assert key_config(Stage(rank=2, overwrite=True)) == {"rank": 2}
