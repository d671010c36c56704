"""The validated configuration tree: defaults, TOML files, dotted overrides, errors, resume safety, docs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from nbody_dt import config as C

REPO = Path(__file__).resolve().parents[1]


def test_defaults_load():
    cfg = C.load()
    assert cfg == C.Config() == C.from_dict({})
    assert isinstance(cfg.replay.batch_size, int) and isinstance(cfg.collect.energy_threshold, float)
    assert isinstance(cfg.model.hidden, tuple) and all(isinstance(h, int) and h > 0 for h in cfg.model.hidden)
    assert cfg.torch_dtype == torch.float64 and cfg.device == "cpu"
    assert cfg.collect.accept_lower < cfg.collect.energy_threshold and cfg.loss.lower < cfg.loss.upper
    # The dict form round-trips.
    assert C.from_dict(cfg.to_dict()) == cfg
    assert C.load(overrides=["dtype='float32'"]).torch_dtype == torch.float32


def test_configs_are_frozen():
    cfg = C.Config()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.epochs = 3
    with pytest.raises(ValidationError, match="frozen"):
        cfg.replay.batch_size = 3
    with pytest.raises(AttributeError):
        cfg.model.hidden.append(1)  # lists are tuples: nothing inside a config can change
    assert C.Config().model.hidden == (48, 48) and hash(cfg) == hash(C.Config())


def test_toml_file_loading(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "epochs = 3\nseed = 7\n"
        "[model]\nkind = \"mlp\"\nerror_series = 0\nseries_margin = 0.0\nhidden = [32, 16]\nfeatures = \"delta_mag\"\n"
        "history_len = 2\n"
        "[replay]\nbatch_size = 256\nverify = \"full\"\n"
        "[initial_conditions]\nkind = \"kepler\"\ne_range = [0, 0.5]\n"
    )
    cfg = C.load(path)
    assert (cfg.epochs, cfg.seed) == (3, 7)
    assert cfg.model.hidden == (32, 16) and cfg.model.features == "delta_mag" and cfg.model.history_len == 2
    assert cfg.replay.batch_size == 256 and cfg.replay.verify == "full"
    assert cfg.initial_conditions.e_range == (0.0, 0.5) and isinstance(cfg.initial_conditions.e_range[0], float)
    assert cfg.loss == C.LossConfig()  # untouched sections keep their defaults
    # Overrides apply on top of the file.
    cfg2 = C.load(path, ["replay.batch_size=64", "model.hidden=[4]"])
    assert cfg2.replay.batch_size == 64 and cfg2.model.hidden == (4,) and cfg2.epochs == 3
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden = 3")
    with pytest.raises(C.ConfigError, match="not valid TOML"):
        C.load(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[replay]\nbatchsize = 3\n")
    with pytest.raises(C.ConfigError, match=r"replay\.batchsize"):
        C.load(unknown)


def test_dotted_overrides():
    cfg = C.load(overrides=[
        "replay.batch_size=256", "model.hidden=[8, 8]", "loss.kind=band", "model.activation='tanh'",
        "compute.dask_address=tcp://10.0.0.1:8786", "collect.energy_threshold=1e-3", "optimizer.lr=3e-4",
        "initial_conditions.a_range=[1, 4]", "epochs = 20",
    ])
    assert cfg.replay.batch_size == 256 and isinstance(cfg.replay.batch_size, int)
    assert cfg.model.hidden == (8, 8)
    assert cfg.loss.kind == "band" and cfg.model.activation == "tanh"
    assert cfg.compute.dask_address == "tcp://10.0.0.1:8786"
    assert cfg.collect.energy_threshold == 1e-3 and cfg.optimizer.lr == 3e-4
    assert cfg.initial_conditions.a_range == (1.0, 4.0) and cfg.epochs == 20
    # A whole number written as a float is accepted for an integer key.
    assert C.load(overrides=["replay.steps=10.0"]).replay.steps == 10
    assert C.parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert C.parse_override("a.b=hello world") == ("a.b", "hello world")
    with pytest.raises(C.ConfigError):
        C.parse_override("replay.batch_size")
    with pytest.raises(C.ConfigError):
        C.parse_override("=3")
    # apply_overrides leaves its input alone.
    data = {"replay": {"batch_size": 4}}
    out = C.apply_overrides(data, ["replay.batch_size=8"])
    assert data == {"replay": {"batch_size": 4}} and out == {"replay": {"batch_size": 8}}
    with pytest.raises(C.ConfigError):
        C.apply_overrides(data, ["replay.batch_size.x=1"])


@pytest.mark.parametrize("override,key,allowed", [
    ("replay.batch_size=0", "replay.batch_size", "[1, 10000000]"),
    ("collect.energy_threshold=0", "collect.energy_threshold", "(0, 1]"),
    ("collect.energy_threshold=1.5", "collect.energy_threshold", "(0, 1]"),
    ("model.hidden=[8, 0]", "model.hidden[1]", "[1, 65536]"),
    ("seed=-1", "seed", "[0, 4294967295]"),
    ("loss.kind=banana", "loss.kind", "one of 'band', 'regression'"),
    ("physics.dim=4", "physics.dim", "one of 2, 3"),
    ("epochs=2.5", "epochs", "an integer in [1, 1000000]"),
    ("replay.batch_size='many'", "replay.batch_size", "an integer"),
    ("optimizer.lr=nan", "optimizer.lr", "(0, 10]"),
    ("optimizer.lr=true", "optimizer.lr", "(0, 10]"),
    ("optimizer.lr='0.1'", "optimizer.lr", "(0, 10]"),
    ("initial_conditions.e_range=[0.1, 1.5]", "initial_conditions.e_range[1]", "[0, 0.999]"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, key, allowed):
    with pytest.raises(C.ConfigError) as info:
        C.load(overrides=[override])
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert allowed in message, message


@pytest.mark.parametrize("override,key", [
    ("replay.bogus=1", "replay.bogus"),
    ("bogus=1", "bogus"),
    ("model.hidden_layers=[8]", "model.hidden_layers"),
])
def test_unknown_keys_are_refused(override, key):
    with pytest.raises(C.ConfigError) as info:
        C.load(overrides=[override])
    assert str(info.value).startswith(key + ": unknown key"), str(info.value)
    assert "known:" in str(info.value)


def test_list_shape_errors():
    with pytest.raises(C.ConfigError, match=r"initial_conditions\.e_range.*lo <= hi"):
        C.load(overrides=["initial_conditions.e_range=[0.5, 0.1]"])
    with pytest.raises(C.ConfigError, match=r"initial_conditions\.a_range"):
        C.load(overrides=["initial_conditions.a_range=[1.0]"])
    with pytest.raises(C.ConfigError, match=r"model\.hidden.*non-empty list"):
        C.load(overrides=["model.hidden=[]"])
    with pytest.raises(C.ConfigError, match=r"model: expected a table"):
        C.load(overrides=["model=3"])


@pytest.mark.parametrize("overrides,key", [
    (["collect.energy_threshold=2e-4", "collect.accept_lower=2e-4"], "collect.accept_lower"),
    (["collect.accept_lower=1e-3", "collect.energy_threshold=1e-4"], "collect.accept_lower"),
    (["loss.lower=2e-4", "loss.upper=1e-4"], "loss.lower"),
    (["model.features=delta_mag", "model.history_len=0"], "model.features"),
    (["initial_conditions.kind=plummer", "physics.dim=2"], "physics.dim"),
    (["initial_conditions.kind=figure8", "initial_conditions.num_orbits=4"], "initial_conditions.num_orbits"),
    (["device=gpu"], "device"),
])
def test_consistency_checks(overrides, key):
    with pytest.raises(C.ConfigError) as info:
        C.load(overrides=overrides)
    assert str(info.value).startswith(key + ":"), str(info.value)


def test_consistent_variants_are_accepted():
    mlp = ["initial_conditions.kind=kepler", "model.kind=mlp", "model.error_series=0", "model.series_margin=0.0"]
    assert C.load(overrides=[*mlp, "model.features=delta_mag", "model.history_len=1"]).model.features == "delta_mag"
    assert C.load(overrides=["collect.accept_lower=0"]).collect.accept_lower == 0.0
    assert C.load(overrides=["initial_conditions.kind=plummer", "physics.dim=3"]).physics.dim == 3
    assert C.load(overrides=["initial_conditions.kind=pythagorean", "initial_conditions.num_orbits=1"])
    assert C.load(overrides=["device=cuda:1"]).device == "cuda:1"


def test_diff_and_safe_keys():
    old = C.Config().to_dict()
    new = C.load(overrides=["epochs=977", "replay.batch_size=7", "compute.evaluator=dask"]).to_dict()
    assert C.diff(old, new) == ["compute.evaluator", "epochs", "replay.batch_size"]
    assert C.diff(old, old) == []
    assert C.diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c"]
    safe = C.safe_keys()
    # Placement, length and retention may change on resume ...
    assert {"epochs", "device", "compute.evaluator", "compute.dask_address", "compute.dask_workers",
            "storage.keep_checkpoints"} <= safe
    # ... the science may not.
    science = ("seed", "dtype", "physics.", "initial_conditions.", "model.", "collect.", "loss.", "replay.",
               "optimizer.")
    assert not [k for k in safe if k.startswith(science)], safe
    d = C.Config().to_dict()
    all_keys = {f"{k}.{j}" for k, v in d.items() if isinstance(v, dict) for j in v}
    all_keys |= {k for k, v in d.items() if not isinstance(v, dict)}
    assert safe <= all_keys
    unsafe = [k for k in C.diff(old, new) if k not in safe]
    assert unsafe == ["replay.batch_size"]


def test_defaults_markdown_matches_the_committed_reference():
    text = C.defaults_markdown()
    for key in ("`epochs`", "`replay.batch_size`", "`collect.energy_threshold`", "`compute.dask_address`",
                "`model.hidden`", "`loss.nonfinite_penalty`"):
        assert key in text
    assert "*resume-safe*" in text and "(0, 1]" in text
    committed = (REPO / "docs" / "CONFIG.md").read_text()
    # docs/CONFIG.md is `nbody-dt config --markdown` output: print() adds one trailing newline.
    assert committed.rstrip("\n") == text.rstrip("\n"), (
        "docs/CONFIG.md is stale: regenerate it with `nbody-dt config --markdown > docs/CONFIG.md`")
