"""offload.train.recipe: loading recipes, their errors, the shipped recipes, and HF model configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
import yaml

from offload.config import Config, ConfigError, Tier, config_to_dict, from_dict
from offload.train import batches, load_tokenizer
from offload.train.recipe import ModelSpec, Recipe, build_hf_config, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MINIMAL: dict[str, Any] = {
    "model": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4},
    "data": {"files": ["corpus/*.txt"], "tokenizer": "bytes"},
    "train": {"steps": 10, "batch_size": 2, "seq_len": 16},
}


def _write_recipe(directory: Path, data: dict[str, Any], name: str = "job.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


def _merged(**sections: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value}
    return out


def _error(tmp_path: Path, data: dict[str, Any], overrides: tuple[str, ...] = ()) -> str:
    path = _write_recipe(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, overrides)
    prefix = f"{path}: "
    assert str(e.value).startswith(prefix), str(e.value)
    return str(e.value)[len(prefix) :]


def test_minimal_recipe_and_defaults(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, MINIMAL, "my-run.yaml")
    recipe = load_recipe(path)
    assert recipe.name == "my-run"
    assert recipe.path == str(path.resolve())
    assert recipe.data.files == [str(tmp_path / "corpus/*.txt")]
    assert (recipe.data.format, recipe.data.field) == ("text", "text")
    t = recipe.train
    assert (t.grad_accum, t.seed, t.log_every, t.save_every) == (1, 0, 1, None)
    assert t.output_dir == "runs/my-run"
    assert (t.checkpoint_dir, t.keep_last, t.keep_every) == ("runs/my-run/checkpoints", None, None)
    assert (t.schedule.name, t.schedule.warmup_steps, t.schedule.min_lr_ratio) == ("constant", 0, 0.0)
    assert recipe.model.max_position_embeddings == 16  # None means train.seq_len
    assert recipe.offload == Config()


def test_overrides(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path, _merged(offload={"optimizer": {"lr": 0.1, "weight_decay": 0.1}}))
    recipe = load_recipe(
        path,
        ["train.steps=5", "offload.optimizer.lr=1e-3", "offload.placement.master=host", "name=other"],
    )
    assert recipe.train.steps == 5
    assert recipe.offload.optimizer.lr == 1e-3
    assert recipe.offload.optimizer.weight_decay == 0.1
    assert recipe.offload.placement.master is Tier.HOST
    assert recipe.name == "other" and recipe.train.output_dir == "runs/other"


def test_relative_inputs_are_under_the_recipe_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    data = {**MINIMAL, "model": {"path": "../models/m"}, "data": {"files": ["/abs/*.txt", "x.txt"]}}
    recipe = load_recipe(_write_recipe(tmp_path / "sub", data))
    assert recipe.model.path == str(tmp_path / "sub" / "../models/m")
    assert recipe.data.files == ["/abs/*.txt", str(tmp_path / "sub" / "x.txt")]


def test_recipe_round_trips_through_json(tmp_path: Path) -> None:
    recipe = load_recipe(_write_recipe(tmp_path, _merged(train={"schedule": {"name": "cosine"}})))
    assert from_dict(Recipe, json.loads(json.dumps(config_to_dict(recipe)))) == recipe


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"path": "/m", "arch": "llama"},
            "model.arch = 'llama': give only one of model.path and model.arch, not both",
        ),
        ({}, "model.arch = None: give model.path (a pretrained directory) or model.arch (from scratch)"),
        (
            {"arch": "llama", "num_layers": 2, "num_heads": 2},
            "model.hidden_size = None: required with model.arch",
        ),
        (
            {"arch": "gpt2", "hidden_size": 8, "num_heads": 2},
            "model.num_layers = None: required with model.arch",
        ),
        ({"arch": "falcon", "hidden_size": 8}, "model.arch = 'falcon': expected one of 'llama', 'mistral'"),
        (
            {"arch": "llama", "hidden_size": 30, "num_layers": 2, "num_heads": 4},
            "model.num_heads = 4: must divide hidden_size = 30",
        ),
        (
            {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 3},
            "model.num_kv_heads = 3: must divide num_heads = 4",
        ),
        (
            {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
            "model.num_kv_heads = 2: gpt2 has no grouped-query attention",
        ),
        (
            {"arch": "llama", "hidden_size": 32, "num_layers": 0, "num_heads": 4},
            "model.num_layers = 0: must be >= 1",
        ),
        (
            {"path": "/m", "hidden_size": 32},
            "model.hidden_size = 32: comes from the model directory's config.json with model.path",
        ),
        ({"arch": "llama", "hidden_size": "big"}, "model.hidden_size = 'big': expected int or None"),
        (
            {"arch": "llama", "tie_embedding": True},
            "model.tie_embedding = True: unknown field; valid fields here: path, arch",
        ),
    ],
)
def test_model_errors(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    assert _error(tmp_path, {**MINIMAL, "model": model}).startswith(message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_merged(train={"stepz": 3}), "train.stepz = 3: unknown field; valid fields here: steps, batch_size"),
        ({**MINIMAL, "train": {"batch_size": 2, "seq_len": 8}}, "train.steps = None: missing required field"),
        (_merged(train={"steps": 0}), "train.steps = 0: must be >= 1"),
        (_merged(train={"batch_size": "8"}), "train.batch_size = '8': expected int, got str"),
        (_merged(train={"grad_accum": 0}), "train.grad_accum = 0: must be >= 1"),
        (_merged(train={"seed": -1}), "train.seed = -1: must be >= 0"),
        (_merged(train={"save_every": 0}), "train.save_every = 0: must be >= 1"),
        (_merged(train={"output_dir": ""}), "train.output_dir = '': must be a directory path"),
        (_merged(train={"checkpoint_dir": ""}), "train.checkpoint_dir = '': must be a directory path"),
        (_merged(train={"keep_last": 0}), "train.keep_last = 0: must be >= 1, or null"),
        (_merged(train={"keep_every": 5}), "train.keep_every = 5: needs keep_last"),
        (_merged(train={"prune": "before"}), "train.prune = 'before': needs keep_last"),
        (_merged(train={"keep_last": 1, "prune": "never"}), "train.prune = 'never'"),
        (_merged(train={"keep_last": 2, "keep_every": 0}), "train.keep_every = 0: must be >= 1"),
        (
            _merged(train={"schedule": {"warmup_steps": 11}}),
            "train.schedule.warmup_steps = 11: more than steps = 10",
        ),
        (
            _merged(train={"schedule": {"name": "exp"}}),
            "train.schedule.name = 'exp': expected one of 'constant', 'linear', 'cosine'",
        ),
        (
            _merged(model={"max_position_embeddings": 8}),
            "train.seq_len = 16: longer than model.max_position_embeddings = 8",
        ),
        (_merged(data={"format": "parquet"}), "data.format = 'parquet': expected one of 'text', 'jsonl'"),
        ({**MINIMAL, "name": "a/b"}, "name = 'a/b': use letters, digits"),
        ({**MINIMAL, "data": ["x.txt"]}, "data = ['x.txt']: expected a mapping of DataSpec fields"),
        (
            {**MINIMAL, "optimizer": {"lr": 1}},
            "optimizer = {'lr': 1}: unknown field; valid fields here: name, model",
        ),
        (_merged(offload={"optimizer": {"lr": -1}}), "offload.optimizer.lr = -1.0: must be >= 0"),
        (
            _merged(offload={"placement": {"master": "ssd"}}),
            "offload.placement.master = 'ssd': expected one of 'auto', 'gpu', 'host', 'cxl', 'nvme'",
        ),
        (_merged(offload={"device": "tpu"}), 'offload.device = \'tpu\': expected "auto", "cpu"'),
        (_merged(offload={"dtype": "int8"}), "offload.dtype = 'int8': expected one of 'bfloat16'"),
        (
            _merged(offload={"budgets": {"host_bytes": "lots"}}),
            "offload.budgets.host_bytes = 'lots': invalid size",
        ),
    ],
)
def test_recipe_errors(tmp_path: Path, data: dict[str, Any], message: str) -> None:
    got = _error(tmp_path, data)
    assert got.startswith(message), got


def test_override_errors_name_the_dotted_path(tmp_path: Path) -> None:
    got = _error(tmp_path, MINIMAL, ("offload.optimizer.lrr=1e-3",))
    assert got.startswith("offload.optimizer.lrr = 0.001: unknown field; valid fields here: lr, betas")
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        load_recipe(_write_recipe(tmp_path, MINIMAL), ["train.steps"])


def test_recipe_file_must_hold_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: <root> = 'just a string': expected a mapping"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------------------
# The shipped recipes


@pytest.mark.parametrize("name", ["tiny", "llama-3b", "llama-7b"])
def test_shipped_recipes_load(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    assert recipe.model.arch == "llama"
    tok = load_tokenizer(recipe.data.tokenizer, recipe.model.path)
    stream = batches(
        recipe.data,
        tok,
        batch_size=recipe.train.batch_size,
        seq_len=recipe.train.seq_len,
        seed=recipe.train.seed,
    )
    batch = next(stream)
    assert batch["input_ids"].shape == (recipe.train.batch_size, recipe.train.seq_len)
    config = build_hf_config(recipe.model, tok.vocab_size, eos_id=tok.eos_id)
    assert int(batch["input_ids"].max()) < config.vocab_size


def test_tiny_recipe_is_a_cpu_job() -> None:
    recipe = load_recipe(RECIPES / "tiny.yaml")
    assert (recipe.offload.device, recipe.offload.dtype) == ("cpu", "float32")
    assert recipe.data.tokenizer == "bytes"
    assert recipe.train.schedule.name == "cosine" and recipe.train.schedule.warmup_steps > 0
    corpus = sum(Path(p).stat().st_size for p in Path(RECIPES / "data").glob("*.txt"))
    assert 50_000 <= corpus <= 200_000


def test_128k_recipe_fills_its_sequence_and_fits_an_h100() -> None:
    """The corpus (about 54K tokens) is cycled to fill one 128K window, and the plan fits the
    H100 machine: its 79.2 GiB device and its 128 GiB of host memory, at its measured rates
    (52 GB/s PCIe, 600 TFLOPS of bf16 matmul, 5.1 G params/s of CPU AdamW); the attention keeps
    need the device memory of all but one device block (with 120 GiB of host memory, too few fit
    to pay: the plan recomputes every block)."""
    from offload.model.hf import build_on_meta
    from offload.plan import make_plan
    from offload.plan.measure import Rates
    from offload.plan.recompute import Keep

    recipe = load_recipe(RECIPES / "llama-7b-128k.yaml")
    t = recipe.train
    assert (t.batch_size, t.seq_len, t.loss_chunk, recipe.data.cycle) == (1, 131072, 8192, True)
    tok = load_tokenizer(recipe.data.tokenizer, None)
    stream = batches(recipe.data, tok, batch_size=1, seq_len=t.seq_len, root=RECIPES)
    assert next(stream)["input_ids"].shape == (1, 131072)
    cfg = recipe.offload
    cfg.budgets.gpu_bytes, cfg.budgets.host_bytes = 85031714816, 128 << 30
    model = build_on_meta(build_hf_config(recipe.model, tok.vocab_size, eos_id=tok.eos_id))
    h100 = Rates(52e9, 52e9, 600e12, attention_flops=300e12, adam_params_s=5.1e9)
    plan = make_plan(model, cfg, batch_size=1, seq_len=t.seq_len, rates=h100, loss_chunk=t.loss_chunk)
    assert plan.fits, plan.problems
    choice = plan.recompute
    assert choice is not None and set(choice.keep) <= {Keep.ATTENTION, Keep.ATTENTION_HOST, Keep.RECOMPUTE}
    assert len(choice.blocks) >= 16 and choice.gain >= 0.10  # the attention keeps that fit, and pay
    assert 0 < plan.device_blocks < 10  # fewer device blocks: their memory pays more as keeps
    cfg.budgets.host_bytes = 120 << 30
    tight = make_plan(model, cfg, batch_size=1, seq_len=t.seq_len, rates=h100, loss_chunk=t.loss_chunk)
    assert tight.fits and tight.recompute is not None and not tight.recompute.blocks


def _parameters(config: transformers.PretrainedConfig) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "hidden", "layers", "inter", "params"),
    [
        # embeddings + head untied (2 V h), per layer 4 h^2 + 3 h i + 2 h, final norm h
        (
            "llama-3b",
            3200,
            26,
            8640,
            2 * 32000 * 3200 + 26 * (4 * 3200**2 + 3 * 3200 * 8640 + 2 * 3200) + 3200,
        ),
        ("llama-7b", 4096, 32, 11008, 6_738_415_616),  # Llama-2-7B's published count
    ],
)
def test_gpu_recipe_shapes(name: str, hidden: int, layers: int, inter: int, params: int) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert (recipe.offload.device, recipe.offload.dtype) == ("cuda", "bfloat16")
    assert (recipe.train.batch_size, recipe.train.seq_len) == (4, 2048)
    config = build_hf_config(recipe.model, 259, eos_id=257)
    assert isinstance(config, transformers.LlamaConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (hidden, layers, inter)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 32, 32000)
    assert _parameters(config) == params


# --------------------------------------------------------------------------------------------------
# Hugging Face configs


@pytest.mark.parametrize(
    ("arch", "cls"),
    [
        ("llama", transformers.LlamaConfig),
        ("mistral", transformers.MistralConfig),
        ("qwen2", transformers.Qwen2Config),
        ("gpt2", transformers.GPT2Config),
    ],
)
def test_build_hf_config_families(arch: str, cls: type) -> None:
    spec = ModelSpec(arch=arch, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16)  # type: ignore[arg-type]
    config = build_hf_config(spec, 259, eos_id=257)
    assert isinstance(config, cls)
    assert config.vocab_size == 259
    assert config.use_cache is False
    assert config._attn_implementation == "sdpa"
    assert config.eos_token_id == 257 and config.bos_token_id is None
    dropouts = {k: v for k, v in config.to_dict().items() if "dropout" in k or k.endswith("pdrop")}
    assert dropouts and all(v == 0.0 for v in dropouts.values()), dropouts
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 259, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_build_hf_config_sizes() -> None:
    spec = ModelSpec(
        arch="llama", hidden_size=4096, num_layers=1, num_heads=32, num_kv_heads=8, vocab_size=32000
    )
    config = build_hf_config(spec, 259)
    assert config.intermediate_size == 11008  # Llama's 8/3 rule, rounded up to 256
    assert config.num_key_value_heads == 8
    assert config.vocab_size == 32000
    assert config.max_position_embeddings == 2048
    gpt2 = build_hf_config(
        ModelSpec(arch="gpt2", hidden_size=64, num_layers=1, num_heads=4, tie_embeddings=True), 300
    )
    assert (gpt2.n_inner, gpt2.n_embd, gpt2.tie_word_embeddings) == (None, 64, True)


def test_vocab_smaller_than_the_tokenizer() -> None:
    spec = ModelSpec(arch="llama", hidden_size=32, num_layers=1, num_heads=4, vocab_size=256)
    with pytest.raises(ConfigError, match=r"^model\.vocab_size = 256: smaller than the tokenizer's 259 ids$"):
        build_hf_config(spec, 259)


def test_build_hf_config_from_a_model_directory(tmp_path: Path) -> None:
    transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, vocab_size=99
    ).save_pretrained(tmp_path)
    config = build_hf_config(ModelSpec(path=str(tmp_path)), 259)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (48, 3, 99)
    assert config.use_cache is False
