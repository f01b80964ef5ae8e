import pytest

from weakseg.config import ConfigError, PipelineCfg, dump_yaml, load_config, parse_overrides


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: a\ntrain_cls:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(f, ["train_cls.epochs=5", "cams.scales=[1.0, 0.5]", "masks.bg_threshold=0.3"])
    assert cfg.name == "a"
    assert cfg.train_cls.epochs == 5
    assert cfg.train_cls.lr == 0.01
    assert cfg.cams.scales == [1.0, 0.5]
    assert cfg.masks.bg_threshold == 0.3
    assert cfg.train_seg.epochs == PipelineCfg().train_seg.epochs


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["train_cls.lr=1"]).train_cls.lr == 1.0
    with pytest.raises(ConfigError, match="train_cls.epochs: expected an integer"):
        load_config(None, ["train_cls.epochs=1.5"])


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train_cls.epoch=3"])
    msg = str(e.value)
    assert "train_cls.epoch" in msg and "train_cls.epochs" in msg and "valid keys" in msg
    f = tmp_path / "c.yaml"
    f.write_text("nonsense: 1\n")
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(f)


@pytest.mark.parametrize("override,fragment", [
    ("train_cls.pretrained=yes please", "expected true/false"),
    ("cams.scales=1.0", "expected a list"),
    ("cams.scales=[1.0, x]", r"cams.scales\[1\]"),
    ("train_cls=3", "expected a mapping"),
    ("novalue", "key=value"),
])
def test_wrong_types_are_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_base_inheritance_and_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text("train_cls:\n  epochs: 9\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain_cls:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train_cls.epochs, cfg.train_cls.lr) == (2, 0.5)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["seed=7", "cams.flip=false"])
    f = tmp_path / "dump.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_every_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert presets, "no presets found"
    for p in presets:
        load_config(p)
