import pytest

from fedfm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    make_config,
    parse_override,
)


def test_default_config_is_the_embedded_experiment():
    cfg = RunConfig()
    assert (cfg.model.name, cfg.data.name, cfg.peft.method) == ("minilm", "bbc-news", "lora")
    assert (cfg.partition.method, cfg.partition.num_clients, cfg.partition.alpha) == (
        "dirichlet",
        10,
        0.5,
    )
    assert (cfg.strategy.aggregator, cfg.strategy.server_optimizer, cfg.strategy.server_lr) == (
        "mean",
        "sgd",
        1.0,
    )


def test_overrides_parse_toml_values():
    assert parse_override("partition.alpha=0.1") == (["partition", "alpha"], 0.1)
    assert parse_override("eval.local=true") == (["eval", "local"], True)
    assert parse_override("model.name=minilm") == (["model", "name"], "minilm")
    assert parse_override('peft.target_modules=["query","key"]')[1] == ["query", "key"]
    assert make_config({}, ["attack.kind=nan"]).attack.kind == "nan"  # not TOML's float nan
    with pytest.raises(ConfigError, match="validation.max_update_norm: Input should be a finite number"):
        make_config({}, ["validation.max_update_norm=inf"])  # null means no bound; inf is refused


@pytest.mark.parametrize(
    "override",
    [
        "training.lr=inf",
        "training.lr=nan",
        "strategy.server_lr=1e9",
        "privacy.clip_norm=inf",
        "strategy.mu=nan",
    ],
)
def test_non_finite_and_absurd_hyperparameters_are_refused(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config({}, [override])
    merged = apply_overrides({"run": {"rounds": 3}}, ["run.seed=7", "partition.alpha=2"])
    assert merged == {"run": {"rounds": 3, "seed": 7}, "partition": {"alpha": 2}}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("rounds")


def test_unknown_key_is_rejected_naming_the_field():
    with pytest.raises(ConfigError, match=r"partition\.alhpa: unknown field"):
        make_config({}, ["partition.alhpa=0.1"])
    with pytest.raises(ConfigError, match=r"bogus: unknown field"):
        make_config({"bogus": {"x": 1}})


def test_bad_values_name_the_field_and_allowed_values():
    with pytest.raises(ConfigError, match=r"partition\.alpha: .*greater than 0.*got -1"):
        make_config({}, ["partition.alpha=-1"])
    with pytest.raises(ConfigError, match=r"peft\.method: .*'lora'.*'full'"):
        make_config({}, ["peft.method=lorax"])
    allowed = "allowed: bulyan, geometric_median, krum, mean, median"
    with pytest.raises(ConfigError, match=rf"strategy\.aggregator: unknown aggregator 'avg'; {allowed}"):
        make_config({}, ["strategy.aggregator=avg"])
    with pytest.raises(
        ConfigError, match="partition.method.*allowed: dirichlet, iid, natural, quantity, shards"
    ):
        make_config({}, ["partition.method=label"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="clients_per_round"):
        make_config({}, ["sampling.clients_per_round=20"])
    with pytest.raises(ConfigError, match="client_test_fraction"):
        make_config({}, ["eval.local=true"])


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[run]\nrounds = 3\n[partition]\nmethod = "iid"\n')
    cfg = load_config(path, ["run.seed=5"])
    assert (cfg.run.rounds, cfg.run.seed, cfg.partition.method) == (3, 5, "iid")
    (tmp_path / "resolved.toml").write_text(cfg.to_toml())
    assert load_config(tmp_path / "resolved.toml") == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
