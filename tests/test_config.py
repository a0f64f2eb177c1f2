"""offload.config: the runtime Config, dict/YAML/override loading, and every error it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from offload.config import (
    BudgetsConfig,
    Config,
    ConfigError,
    OptimizerConfig,
    PlacementConfig,
    Tier,
    apply_overrides,
    config_to_dict,
    from_dict,
    load_config,
    load_yaml,
    merge_dicts,
)

GiB = 1 << 30


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.device == "auto"
    assert cfg.dtype == "bfloat16"
    assert cfg.slots == 2
    assert cfg.optimizer == OptimizerConfig(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert cfg.optimizer.max_grad_norm is None
    assert cfg.placement == PlacementConfig(
        master=Tier.HOST, optimizer_state=Tier.HOST, gradients=Tier.HOST, activations=Tier.GPU
    )
    assert cfg.budgets == BudgetsConfig()
    assert (cfg.nvme_dirs, cfg.cxl_nodes, cfg.trace, cfg.seed) == ([], [], None, None)


def test_tier_names() -> None:
    assert [t.value for t in Tier] == ["auto", "gpu", "host", "cxl", "nvme"]
    assert Tier("nvme") is Tier.NVME
    assert Tier.HOST == "host"


def test_from_dict_builds_nested_sections() -> None:
    cfg = load_config(
        {
            "device": "cpu",
            "dtype": "float32",
            "optimizer": {"lr": 3e-3, "betas": [0.9, 0.95], "max_grad_norm": 1},
            "placement": {"optimizer_state": "nvme"},
            "nvme_dirs": ["/mnt/a", "/mnt/b"],
            "budgets": {"host_bytes": "64GiB", "gpu_bytes": 1024},
        }
    )
    assert cfg.device == "cpu"
    assert cfg.optimizer.betas == (0.9, 0.95)  # a YAML list becomes the tuple the field declares
    assert cfg.optimizer.max_grad_norm == 1.0 and isinstance(cfg.optimizer.max_grad_norm, float)
    assert cfg.placement.optimizer_state is Tier.NVME
    assert cfg.placement.master is Tier.HOST
    assert cfg.budgets.host_bytes == 64 * GiB
    assert cfg.budgets.gpu_bytes == 1024


def test_constructor_takes_sections_as_dicts() -> None:
    cfg = Config(optimizer={"lr": 2e-3}, placement={"master": "host"})  # type: ignore[arg-type]
    assert cfg.optimizer.lr == 2e-3
    assert cfg.placement.master is Tier.HOST


def test_nested_override_merges_into_the_section() -> None:
    base = {"optimizer": {"lr": 1.0, "eps": 1e-6, "weight_decay": 0.1}, "device": "cpu"}
    cfg = load_config(base, optimizer={"lr": 1e-3})
    assert cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.eps == 1e-6
    assert cfg.optimizer.weight_decay == 0.1
    assert cfg.device == "cpu"
    assert base["optimizer"] == {"lr": 1.0, "eps": 1e-6, "weight_decay": 0.1}  # input left alone


def test_override_of_a_config_instance() -> None:
    start = load_config(device="cpu", optimizer={"weight_decay": 0.1})
    cfg = load_config(start, optimizer={"lr": 5e-4}, slots=3)
    assert (cfg.device, cfg.slots) == ("cpu", 3)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (5e-4, 0.1)
    assert start.slots == 2


def test_override_with_a_dataclass_replaces_the_section() -> None:
    cfg = load_config({"optimizer": {"eps": 1e-6}}, optimizer=OptimizerConfig(lr=0.5))
    assert cfg.optimizer == OptimizerConfig(lr=0.5)


def test_merge_dicts_is_recursive_and_pure() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert merge_dicts(base, {"a": {"c": {"d": 4}}, "f": 5}) == {"a": {"b": 1, "c": {"d": 4}}, "e": 3, "f": 5}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}


def test_dotted_overrides_parse_yaml_values() -> None:
    raw = {"optimizer": {"lr": 1.0, "eps": 1e-6}}
    out = apply_overrides(
        raw,
        [
            "optimizer.lr=1e-3",
            "device=cpu",
            "optimizer.betas=[0.9, 0.95]",
            "slots=4",
            "budgets.host_bytes=64GiB",
            "trace=null",
            "seed=",
        ],
    )
    assert out == {
        "optimizer": {"lr": 1e-3, "eps": 1e-6, "betas": [0.9, 0.95]},
        "device": "cpu",
        "slots": 4,
        "budgets": {"host_bytes": "64GiB"},
        "trace": None,
        "seed": None,
    }
    assert raw == {"optimizer": {"lr": 1.0, "eps": 1e-6}}
    cfg = load_config(out)
    assert cfg.optimizer.lr == 1e-3 and cfg.budgets.host_bytes == 64 * GiB


@pytest.mark.parametrize("item", ["optimizer.lr", "=3", "optimizer..lr=3", "optimizer.=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        apply_overrides({}, [item])


def test_override_value_that_is_not_yaml() -> None:
    with pytest.raises(ConfigError, match=r"optimizer\.betas.*not valid YAML"):
        apply_overrides({}, ["optimizer.betas=[0.9"])


def test_override_of_unknown_dotted_field_is_reported_with_its_path() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(apply_overrides({}, ["optimizer.learning_rate=1e-3"]))
    assert e.value.field == "optimizer.learning_rate"
    assert "unknown field" in str(e.value)
    assert "lr, betas, eps, weight_decay, max_grad_norm" in str(e.value)


def test_unknown_nested_field() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(optimizer={"lrr": 0.1})
    msg = str(e.value)
    assert msg.startswith("optimizer.lrr = 0.1: unknown field")
    assert "valid fields here: lr, betas, eps, weight_decay, max_grad_norm" in msg
    assert isinstance(e.value, ValueError)


def test_unknown_top_level_field() -> None:
    with pytest.raises(
        ConfigError, match=r"^optimiser = \{'lr': 1\}: unknown field; valid fields here: device, "
    ):
        load_config({"optimiser": {"lr": 1}})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer": {"lr": "fast"}}, "optimizer.lr = 'fast': expected float, got str"),
        ({"optimizer": {"lr": True}}, "optimizer.lr = True: expected float, got bool"),
        ({"slots": 2.5}, "slots = 2.5: expected int, got float"),
        ({"slots": True}, "slots = True: expected int, got bool"),
        ({"slots": "2"}, "slots = '2': expected int, got str"),
        ({"nvme_dirs": "/mnt/a"}, "nvme_dirs = '/mnt/a': expected list[str], got str"),
        ({"nvme_dirs": ["/mnt/a", 3]}, "nvme_dirs[1] = 3: expected str, got int"),
        ({"cxl_nodes": [1, "two"]}, "cxl_nodes[1] = 'two': expected int, got str"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas = [0.9]: expected tuple[float, float] (2 items)"),
        ({"optimizer": {"betas": 0.9}}, "optimizer.betas = 0.9: expected tuple[float, float], got float"),
        ({"optimizer": {"max_grad_norm": "1"}}, "optimizer.max_grad_norm = '1': expected float or None"),
        ({"optimizer": 3}, "optimizer = 3: expected a mapping of OptimizerConfig fields"),
        ({"trace": 1}, "trace = 1: expected str or None"),
        ({"seed": 1.5}, "seed = 1.5: expected int or None"),
    ],
)
def test_bad_type(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(**overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_bad_tier() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(placement={"gradients": "disk"})
    assert str(e.value) == (
        "placement.gradients = 'disk': expected one of 'auto', 'gpu', 'host', 'cxl', 'nvme'"
    )


def test_bad_dtype() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(dtype="fp8")
    assert str(e.value) == "dtype = 'fp8': expected one of 'bfloat16', 'float16', 'float32'"


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cpu:0", ""])
def test_bad_device(device: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(device=device)
    assert str(e.value) == f'device = {device!r}: expected "auto", "cpu", "cuda" or "cuda:N"'


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_device(device: str) -> None:
    assert load_config(device=device).device == device


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"slots": 1}, "slots = 1: must be >= 2"),
        ({"optimizer": {"lr": -1e-3}}, "optimizer.lr = -0.001: must be >= 0"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas[1] = 1.0: must be in [0, 1)"),
        ({"optimizer": {"betas": [-0.1, 0.9]}}, "optimizer.betas[0] = -0.1: must be in [0, 1)"),
        ({"optimizer": {"eps": 0}}, "optimizer.eps = 0.0: must be > 0"),
        ({"optimizer": {"weight_decay": -0.1}}, "optimizer.weight_decay = -0.1: must be >= 0"),
        ({"optimizer": {"max_grad_norm": 0}}, "optimizer.max_grad_norm = 0.0: must be > 0"),
        ({"budgets": {"host_bytes": -1}}, "budgets.host_bytes = -1: must not be negative"),
        ({"budgets": {"nvme_bytes": "12XB"}}, "budgets.nvme_bytes = '12XB': invalid size '12XB'"),
        ({"budgets": {"gpu_bytes": 1.5}}, "budgets.gpu_bytes = 1.5: expected int or None"),
        ({"cxl_nodes": [-1]}, "cxl_nodes[0] = -1: must be a NUMA node id >= 0"),
        ({"nvme_dirs": [""]}, "nvme_dirs[0] = '': must be a directory path"),
        (
            {"placement": {"optimizer_state": "nvme"}},
            "nvme_dirs = []: placement uses the nvme tier (placement.optimizer_state): name a directory",
        ),
        (
            {"placement": {"master": "cxl", "gradients": "cxl"}},
            "cxl_nodes = []: placement uses the cxl tier (placement.master, placement.gradients): name "
            "a NUMA node of CXL memory (offload doctor lists them)",
        ),
        (
            {"dtype": "float32", "placement": {"master": "cxl"}, "cxl_nodes": [0]},
            "placement.master = 'cxl': in float32 the master is itself the pinned copy the device reads, "
            "so it stays in host RAM: use dtype bfloat16 or float16, or master host",
        ),
        (
            {"placement": {"gradients": "nvme"}, "nvme_dirs": ["/x"]},
            "placement.gradients = 'nvme': a gradient sum on nvme would be read and written back once per "
            "micro-batch, on backward's critical path (8 bytes a parameter of disk traffic each time): use "
            "gradients cxl or host, or fewer micro-batches of a larger batch",
        ),
        (
            {"placement": {"optimizer_state": "nvme", "spill_blocks": -1}, "nvme_dirs": ["/x"]},
            "placement.spill_blocks = -1: must be >= 0, or null",
        ),
        (
            {"placement": {"spill_blocks": 2}},
            "placement.spill_blocks = 2: blocks spill to the optimizer_state tier, and it is host: set "
            "optimizer_state to nvme, cxl or auto (or master or gradients to cxl)",
        ),
        (
            {"placement": {"optimizer_state": "auto", "spill_blocks": 2}},
            "placement.spill_blocks = 2: optimizer_state auto spills to the nvme tier: name nvme_dirs",
        ),
        (
            {
                "placement": {"master": "nvme", "optimizer_state": "cxl"},
                "nvme_dirs": ["/x"],
                "cxl_nodes": [0],
            },
            "placement.master = 'nvme': needs optimizer_state nvme or auto, not cxl",
        ),
        (
            {
                "dtype": "float32",
                "placement": {"master": "nvme", "optimizer_state": "nvme"},
                "nvme_dirs": ["/x"],
            },
            "placement.master = 'nvme': in float32 the master is itself the pinned copy the device reads",
        ),
        (
            {"placement": {"device_blocks": "many"}},
            "placement.device_blocks = 'many': expected int or one of 'auto'",
        ),
        ({"placement": {"device_blocks": -2}}, 'placement.device_blocks = -2: must be >= 0 or "auto"'),
    ],
)
def test_bad_value(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(**overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_spill_blocks_with_only_masters_or_gradient_sums_spilling() -> None:
    """spill_blocks counts the blocks whose state leaves host RAM, whichever kind leaves it."""
    for placement in ({"master": "cxl"}, {"gradients": "cxl"}):
        cfg = load_config(placement={**placement, "spill_blocks": 2}, cxl_nodes=[0])
        assert cfg.placement.spill_blocks == 2 and cfg.placement.spills()
    assert not PlacementConfig().spills()


def test_direct_construction_checks_too() -> None:
    with pytest.raises(ValueError, match=r"^lr = -1\.0: must be >= 0"):
        OptimizerConfig(lr=-1)
    with pytest.raises(ValueError, match=r"^master = 'disk': expected one of"):
        PlacementConfig(master="disk")  # type: ignore[arg-type]


def test_budgets_parse_sizes() -> None:
    b = BudgetsConfig(gpu_bytes="80GiB", host_bytes="1.5T", cxl_bytes="100GB", nvme_bytes=7)  # type: ignore[arg-type]
    assert (b.gpu_bytes, b.host_bytes, b.cxl_bytes, b.nvme_bytes) == (80 * GiB, 1536 * GiB, 100 * 10**9, 7)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        device="cuda:1",
        dtype="float16",
        slots=3,
        optimizer={"lr": 3e-4, "betas": (0.8, 0.9), "max_grad_norm": 1.0, "weight_decay": 0.1},
        placement={"optimizer_state": "nvme", "activations": "cxl", "master": "auto"},
        nvme_dirs=["/mnt/nvme0", "/mnt/nvme1"],
        cxl_nodes=[2, 3],
        budgets={"host_bytes": "256GiB", "nvme_bytes": "4TiB"},
        trace="trace.json",
        seed=7,
    )
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg
    assert from_dict(Config, json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_config_to_dict_is_plain_data() -> None:
    d = config_to_dict(load_config(placement={"master": "host"}))
    assert d["placement"]["master"] == "host" and type(d["placement"]["master"]) is str
    assert d["optimizer"]["betas"] == [0.9, 0.999]
    assert json.loads(json.dumps(d)) == d


def test_yaml_reads_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optimizer:\n  lr: 3e-4\n  eps: 1E-8\n")
    cfg = load_config(path)
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.eps == 1e-8


def test_yaml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("device: cpu\noptimizer:\n  lr: 0.1\n  weight_decay: 0.01\n")
    cfg = load_config(path, optimizer={"lr": 0.2})
    assert (cfg.device, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("cpu", 0.2, 0.01)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("optimizer:\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: optimizer.lr = 'fast': expected float, got str"
    assert e.value.source == str(path) and e.value.field == "optimizer.lr"


def test_yaml_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top of the file"):
        load_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    assert load_config(empty) == Config()


def test_config_argument_of_wrong_kind() -> None:
    with pytest.raises(ConfigError, match="expected None, a Config, a dict or a YAML file path"):
        load_config(42)  # type: ignore[arg-type]


def test_torch_dtype() -> None:
    assert load_config(dtype="bfloat16").torch_dtype is torch.bfloat16
    assert load_config(dtype="float16").torch_dtype is torch.float16
    assert load_config(dtype="float32").torch_dtype is torch.float32


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config().resolve_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_config().resolve_device() == "cuda"
    assert load_config(device="cpu").resolve_device() == "cpu"
    assert load_config(device="cuda:3").resolve_device() == "cuda:3"


@given(
    lr=st.floats(0, 1),
    betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
    eps=st.floats(1e-12, 1e-3),
    clip=st.none() | st.floats(0.01, 100),
    slots=st.integers(2, 8),
    tiers=st.lists(st.sampled_from(["auto", "gpu", "host"]), min_size=4, max_size=4),
    host=st.none() | st.integers(0, 1 << 45),
    seed=st.none() | st.integers(0, 2**31),
)
def test_round_trip_property(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    clip: float | None,
    slots: int,
    tiers: list[str],
    host: int | None,
    seed: int | None,
) -> None:
    cfg = load_config(
        optimizer={"lr": lr, "betas": betas, "eps": eps, "max_grad_norm": clip},
        placement=dict(zip(["master", "optimizer_state", "gradients", "activations"], tiers, strict=True)),
        slots=slots,
        budgets={"host_bytes": host},
        seed=seed,
    )
    assert from_dict(Config, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert load_config(cfg) == cfg
