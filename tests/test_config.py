"""Config loading, overrides and layout validation: every bad value is one line naming the field."""
import pytest

from rapidnlp.config import apply, Config, accumulation_steps, load_config, max_predictions, parse_overrides, resolve_layout
from rapidnlp.errors import UserError

from conftest import REPO


def test_tiny_config_loads_with_overrides():
    config = load_config(str(REPO / "configs" / "tiny.toml"), ["--parallel.tp", "2", "--train.steps=7",
                                                               "--model.fused_kernels", "true"])
    assert (config.model.num_layers, config.model.hidden_size, config.model.num_heads) == (4, 128, 4)
    assert config.model.dropout == 0.0
    assert config.train.global_batch == 4 * config.train.micro_batch
    assert config.train.warmup_steps <= 2
    assert config.parallel.tp == 2 and config.train.steps == 7 and config.model.fused_kernels is True
    assert config.data.tokenizer == config.data.path + ".model"
    resolve_layout(config, 4)
    assert config.parallel.dp == 2 and accumulation_steps(config) == 2


@pytest.mark.parametrize("name", ["base", "300m", "1.5b"])
def test_larger_configs_use_dropout(name):
    config = load_config(str(REPO / "configs" / f"{name}.toml"))
    assert config.model.dropout == 0.1


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(UserError, match=r"unknown key 'train.step'; did you mean 'train.steps'\?"):
        load_config(None, ["--train.step", "3"])
    with pytest.raises(UserError, match=r"unknown key 'trian'; did you mean 'train'\?"):
        load_config(None, ["--trian.steps", "3"])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nhiden_size = 64\n")
    with pytest.raises(UserError, match=r"bad.toml: unknown key 'model.hiden_size'; did you mean 'model.hidden_size'"):
        load_config(str(path))


def test_bad_values_name_the_field(tmp_path):
    with pytest.raises(UserError, match=r"train.steps: expected an integer, got 'many'"):
        load_config(None, ["--train.steps", "many"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "broken.toml").write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(str(tmp_path / "broken.toml"))


def test_override_syntax():
    assert parse_overrides(["--a.b", "1", "--c.d=x"]) == [("a", "b", "1"), ("c", "d", "x")]
    with pytest.raises(UserError, match="expected --section.field value"):
        parse_overrides(["steps"])
    with pytest.raises(UserError, match="needs a value"):
        parse_overrides(["--train.steps"])


def _layout(world, **fields):
    config = Config()
    for name, value in fields.items():
        section, key = name.split("__")
        apply(config, section, key, value, "test")
    resolve_layout(config, world)
    return config


@pytest.mark.parametrize("world, fields, message", [
    (4, {"parallel__tp": 3}, r"world size 4 is not divisible by parallel.tp \(3\)"),
    (4, {"parallel__tp": 2, "parallel__dp": 3}, r"= 6, but the world size is 4"),
    (2, {"parallel__tp": 2, "model__num_heads": 3, "model__hidden_size": 96}, r"model.num_heads \(3\) is not divisible by parallel.tp \(2\)"),
    (1, {"model__hidden_size": 130}, r"model.hidden_size \(130\) is not divisible by model.num_heads \(4\)"),
    (2, {"train__global_batch": 6, "train__micro_batch": 2}, r"train.global_batch \(6\) is not divisible by train.micro_batch \(2\) x parallel.dp \(2\)"),
    (2, {"parallel__tp": 2, "data__seq_len": 63, "model__max_position_embeddings": 64}, r"data.seq_len \(63\) is not divisible by parallel.tp \(2\)"),
    (1, {"data__seq_len": 1024}, r"data.seq_len \(1024\) exceeds model.max_position_embeddings"),
    (1, {"parallel__dp_mode": "ddp"}, r"parallel.dp_mode was removed: set parallel.zero instead"),
    (1, {"objectives__mlm": -1.0}, r"objectives.mlm = -1.0: a loss weight must be at least 0"),
    (1, {"objectives__nope": 1.0}, r"objectives.nope: no such objective"),
    (1, {"train__precision": "fp8"}, r"train.precision = 'fp8'"),
    (2, {"parallel__zero": 1, "parallel__tp": 2, "train__global_batch": 8}, r"parallel.zero = 1 with parallel.tp > 1"),
    (2, {"parallel__hsdp_shard": 2, "parallel__zero": 0}, r"parallel.hsdp_shard = 2 needs parallel.zero = 2 or 3"),
    (4, {"parallel__hsdp_shard": 3}, r"parallel.dp \(4\) is not divisible by parallel.hsdp_shard \(3\)"),
    (2, {"parallel__cpu_offload": True, "parallel__zero": 2}, r"parallel.cpu_offload needs parallel.zero = 3"),
    (1, {"train__activation_checkpoint": "some"}, r"train.activation_checkpoint = 'some'"),
    (1, {"train__grad_reduce_dtype": "fp8"}, r"train.grad_reduce_dtype = 'fp8'"),
    (1, {"train__backend": "megatron"}, r"train.backend = 'megatron': choose torch or deepspeed"),
    (4, {"train__backend": "deepspeed", "parallel__pp": 2, "parallel__zero": 2},
     r"DeepSpeed's pipeline engine cannot combine with ZeRO-2/3"),
    (2, {"train__backend": "deepspeed", "parallel__tp": 2, "train__global_batch": 8},
     r"train.backend = deepspeed runs data parallelism only"),
    (2, {"train__backend": "deepspeed", "train__optimizer": "lamb"}, r"train.optimizer = lamb is not offered"),
    (2, {"train__backend": "deepspeed", "train__deepspeed_config": "/no/such/ds.json"},
     r"train.deepspeed_config: /no/such/ds.json not found"),
    (2, {"train__backend": "deepspeed", "parallel__zero": 3, "model__fused_kernels": True,
         "checkpoint__enabled": False},
     r"model.fused_kernels with DeepSpeed ZeRO-3: the fused MLM loss decodes after the forward"),
])
def test_impossible_layouts(world, fields, message):
    with pytest.raises(UserError, match=message) as info:
        _layout(world, **fields)
    assert "\n" not in str(info.value)


def test_vocab_padding_does_not_depend_on_tp():
    config = Config()
    config.model.vocab_size = 1000
    assert config.model.padded_vocab_size == 1024
    config.model.vocab_size = 1024
    assert config.model.padded_vocab_size == 1024


def test_max_predictions_default():
    config = Config()
    config.data.seq_len, config.data.mask_prob = 128, 0.15
    assert max_predictions(config) == 22  # ceil(19.2) + 2


def test_a_resumed_checkpoint_keeps_its_recorded_settings():
    """config.RECORDED: what a checkpoint's config.json says wins; a field it lacks (written
    before the field existed) means the old behaviour, the dataclass default."""
    from rapidnlp.config import keep_recorded, load_config

    config = load_config(str(REPO / "configs" / "tiny.toml"))
    assert config.model.norm_position == "post" and config.data.dynamic_mask
    old = {"model": {"num_layers": 4}, "data": {"seq_len": 128}, "train": {"precision": "fp32"}}
    lines = keep_recorded(config, old, "ckpt/config.json")
    assert config.model.norm_position == "pre" and not config.data.dynamic_mask
    assert any("model.norm_position = 'pre'" in line for line in lines) and len(lines) == 2
    assert keep_recorded(config, {"model": {"norm_position": "pre"}}, "x") == []
    keep_recorded(config, {"model": {"norm_position": "post"}, "data": {"dynamic_mask": True}}, "x")
    assert config.model.norm_position == "post" and config.data.dynamic_mask
    bad = load_config(None, ["--model.norm_position", "middle"])
    with pytest.raises(UserError, match="model.norm_position = 'middle': choose post"):
        resolve_layout(bad, 1)
