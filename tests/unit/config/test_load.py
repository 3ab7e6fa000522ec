"""Config loading: strict schema, `${ENV}` interpolation, every problem with its dotted path;
then compile_config's reference checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from setpoint.config.compile import compile_config
from setpoint.config.load import format_path, load_config, parse_config
from setpoint.config.schema import OpenAICompatibleProviderConfig, RootConfig, SimulatedProviderConfig
from setpoint.errors import ConfigError
from setpoint.keys.model import hash_key
from setpoint.providers.openai_compatible import OpenAICompatibleProvider
from setpoint.providers.simulated.provider import SimulatedProvider

KEY_A = "sk-test-aaaaaaaaaaaaaaaa"
KEY_B = "sk-test-bbbbbbbbbbbbbbbb"


def good() -> dict[str, Any]:
    return {
        "providers": {
            "sim": {"type": "simulated", "seed": 3},
            "oai": {"type": "openai_compatible", "base_url": "https://api.openai.com/v1/", "api_key": "sk-up"},
        },
        "models": {
            "m": {"deployments": [{"provider": "sim", "model": "mini"},
                                  {"provider": "oai", "model": "gpt-4o-mini",
                                   "pricing": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}]},
            "e": {"kind": "embedding", "deployments": [{"provider": "sim", "model": "embed"}]},
        },
        "keys": [{"name": "a", "key": KEY_A, "team": "t", "models": ["m"]}, {"name": "b", "key": KEY_B}],
    }


def problems_of(data: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.problems


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("models", "gpt-4o", "deployments", 1, "provider"), "models.gpt-4o.deployments[1].provider"),
        (("keys", 0, "models", 2), "keys[0].models[2]"),
        (("data_dir",), "data_dir"),
        ((), ""),
        ((0,), "[0]"),
    ],
)
def test_format_path(loc: tuple[int | str, ...], path: str) -> None:
    assert format_path(loc) == path


def test_good_config_parses() -> None:
    root = parse_config(good(), env={})
    assert isinstance(root.providers["sim"], SimulatedProviderConfig)
    oai = root.providers["oai"]
    assert isinstance(oai, OpenAICompatibleProviderConfig)
    assert oai.base_url == "https://api.openai.com/v1"  # trailing slash stripped
    assert root.models["e"].kind == "embedding"


def test_empty_document_gives_defaults() -> None:
    root = parse_config(None, env={})
    assert root == RootConfig()
    assert root.server.port == 8080


def test_dotted_path_for_bad_deployment_field() -> None:
    cfg = good()
    cfg["models"]["m"]["deployments"][1]["provider"] = 7
    probs = problems_of(cfg)
    assert len(probs) == 1
    assert probs[0].startswith("models.m.deployments[1].provider: ")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(extra_top=1), "extra_top: unknown key"),
        (lambda c: c["providers"]["sim"].update(sed=1), "providers.sim.sed: unknown key"),
        (lambda c: c["providers"]["oai"].update(timeout=3), "providers.oai.timeout: unknown key"),
        (lambda c: c["models"]["m"]["deployments"][0].update(wieght=2), "models.m.deployments[0].wieght: unknown key"),
        (lambda c: c["keys"][1].update(secret="x"), "keys[1].secret: unknown key"),
        (lambda c: c.update(server={"prot": 1}), "server.prot: unknown key"),
    ],
)
def test_unknown_keys(mutate: Any, expected: str) -> None:
    cfg = good()
    mutate(cfg)
    assert problems_of(cfg) == [expected]


def test_unknown_provider_type() -> None:
    cfg = good()
    cfg["providers"]["x"] = {"type": "anthropic_magic", "base_url": "https://x"}
    assert problems_of(cfg) == ["providers.x: unknown provider type 'anthropic_magic'"]


def test_provider_field_errors_have_no_union_tag_in_path() -> None:
    cfg = good()
    cfg["providers"]["oai"]["base_url"] = "ftp://nope"
    cfg["providers"]["sim"]["embedding_dim"] = 0
    probs = problems_of(cfg)
    assert any(p.startswith("providers.oai.base_url: ") and "http://" in p for p in probs)
    assert any(p.startswith("providers.sim.embedding_dim: ") for p in probs)
    assert not any("openai_compatible" in p.split(":")[0] or "simulated" in p.split(":")[0] for p in probs)


def test_every_problem_is_reported() -> None:
    cfg = good()
    cfg["bogus"] = True
    cfg["providers"]["sim"]["latency"] = {"ttft_ms": -1}
    cfg["providers"]["bad"] = {"type": "nope"}
    cfg["models"]["m"]["deployments"][0]["modle"] = "typo"
    cfg["models"]["z"] = {"deployments": []}
    cfg["keys"][0]["key"] = "short"
    cfg["server"] = {"port": 70000}
    cfg["logging"] = {"spool_segment_bytes": 10}
    probs = problems_of(cfg)
    expected_prefixes = [
        "bogus: unknown key",
        "providers.sim.latency.ttft_ms: ",
        "providers.bad: unknown provider type 'nope'",
        "models.m.deployments[0].modle: unknown key",
        "models.z.deployments: ",
        "keys[0].key: ",
        "server.port: ",
        "logging.spool_segment_bytes: ",
    ]
    for prefix in expected_prefixes:
        assert sum(p.startswith(prefix) for p in probs) == 1, (prefix, probs)
    assert len(probs) == len(expected_prefixes)


def test_problems_become_message_lines() -> None:
    cfg = good()
    cfg["a"] = 1
    cfg["b"] = 2
    with pytest.raises(ConfigError) as info:
        parse_config(cfg, env={})
    assert str(info.value).splitlines() == info.value.problems == ["a: unknown key", "b: unknown key"]


def test_top_level_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["providers"], env={})


@pytest.mark.parametrize("name", ["providers", "models"])
def test_reserved_prefix_rejected(name: str) -> None:
    cfg = good()
    if name == "providers":
        cfg["providers"]["setpoint:internal"] = {"type": "simulated"}
    else:
        cfg["models"]["setpoint:cache"] = {"deployments": [{"provider": "sim", "model": "x"}]}
    probs = problems_of(cfg)
    assert len(probs) == 1
    assert probs[0].startswith(f"{name}: ")
    assert "setpoint:" in probs[0] and "reserved" in probs[0]


def test_names_merely_containing_the_prefix_are_fine() -> None:
    cfg = good()
    cfg["models"]["my-setpoint:model"] = {"deployments": [{"provider": "sim", "model": "x"}]}
    assert "my-setpoint:model" in parse_config(cfg, env={}).models


# -- ${ENV} interpolation -----------------------------------------------------------------------


def test_env_interpolation() -> None:
    cfg = good()
    cfg["providers"]["oai"]["api_key"] = "${OPENAI_API_KEY}"
    cfg["providers"]["oai"]["base_url"] = "${OPENAI_BASE:-https://api.openai.com}/v1"
    cfg["keys"][0]["key"] = "${KEY_PREFIX}-${KEY_BODY}"
    cfg["server"] = {"port": "${PORT:-9000}", "host": "${HOST:-0.0.0.0}"}
    env = {"OPENAI_API_KEY": "sk-up-secret", "KEY_PREFIX": "sk-test", "KEY_BODY": "0123456789abcdef", "HOST": "10.0.0.1"}
    root = parse_config(cfg, env=env)
    oai = root.providers["oai"]
    assert isinstance(oai, OpenAICompatibleProviderConfig)
    assert oai.api_key == "sk-up-secret"
    assert oai.base_url == "https://api.openai.com/v1"
    assert root.keys[0].key == "sk-test-0123456789abcdef"
    assert root.server.port == 9000
    assert root.server.host == "10.0.0.1"  # set variable beats the default


def test_env_default_may_be_empty_and_values_are_not_reinterpolated() -> None:
    cfg = {"data_dir": "/data${SUFFIX:-}", "admin": {"master_key": "${MASTER}"}}
    root = parse_config(cfg, env={"MASTER": "${NOT_EXPANDED}-aaaaaaaaaaaa"})
    assert root.data_dir == "/data"
    assert root.admin.master_key == "${NOT_EXPANDED}-aaaaaaaaaaaa"


def test_env_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SETPOINT_TEST_DATA_DIR", "/from/environ")
    assert parse_config({"data_dir": "${SETPOINT_TEST_DATA_DIR}"}).data_dir == "/from/environ"


def test_missing_env_var_reported_with_path() -> None:
    cfg = good()
    cfg["providers"]["oai"]["api_key"] = "${OPENAI_API_KEY}"
    cfg["keys"][1]["key"] = "${KEY_B_SECRET}"
    cfg["data_dir"] = "${DATA_DIR}"
    probs = problems_of(cfg)
    assert "providers.oai.api_key: environment variable OPENAI_API_KEY is not set" in probs
    assert "keys[1].key: environment variable KEY_B_SECRET is not set" in probs
    assert "data_dir: environment variable DATA_DIR is not set" in probs


def test_missing_env_var_in_a_list_and_alongside_schema_errors() -> None:
    cfg = good()
    cfg["keys"][0]["models"] = ["m", "${EXTRA_MODEL}"]
    cfg["unknown"] = 1
    probs = problems_of(cfg)
    assert "keys[0].models[1]: environment variable EXTRA_MODEL is not set" in probs
    assert "unknown: unknown key" in probs


def test_non_string_values_untouched_and_literal_dollar_kept() -> None:
    root = parse_config({"data_dir": "cost$5-${X:-a}", "server": {"port": 81}}, env={})
    assert root.data_dir == "cost$5-a"
    assert root.server.port == 81


# -- load_config (files) ------------------------------------------------------------------------


def test_load_config_from_yaml(tmp_path: Path) -> None:
    p = tmp_path / "setpoint.yaml"
    p.write_text(
        "data_dir: ${DIR:-state}\n"
        "providers:\n  sim: {type: simulated, seed: 5}\n"
        "models:\n  m:\n    deployments:\n      - {provider: sim, model: mini}\n"
    )
    root = load_config(p, env={})
    assert root.data_dir == "state"
    assert root.providers["sim"].seed == 5  # type: ignore[union-attr]


def test_load_config_yaml_errors_have_paths(tmp_path: Path) -> None:
    p = tmp_path / "setpoint.yaml"
    p.write_text("models:\n  m:\n    deployments:\n      - {provider: sim, model: a}\n      - {model: b}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, env={})
    assert info.value.problems == ["models.m.deployments[1].provider: Field required"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert info.value.path == str(p)
    assert "cannot read config file" in str(info.value)


def test_load_config_invalid_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_load_config_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p, env={}) == RootConfig()


# -- compile_config -----------------------------------------------------------------------------


def compile_problems(data: dict[str, Any]) -> list[str]:
    root = parse_config(data, env={})
    with pytest.raises(ConfigError) as info:
        compile_config(root)
    return info.value.problems


def test_compile_good_config(tmp_path: Path) -> None:
    rt = compile_config(parse_config({**good(), "data_dir": "state"}, env={}), base_dir=tmp_path)
    assert isinstance(rt.providers["sim"], SimulatedProvider)
    assert isinstance(rt.providers["oai"], OpenAICompatibleProvider)
    assert [d.name for d in rt.routes["m"].deployments] == ["sim/mini", "oai/gpt-4o-mini"]
    assert rt.routes["e"].kind == "embedding"
    assert rt.routes["m"].deployments[1].pricing is not None
    assert rt.routes["m"].deployments[1].pricing.input_pico == 150_000
    assert rt.data_dir == tmp_path / "state"
    # Static keys are stored by hash, never by secret.
    assert set(rt.static_keys) == {hash_key(KEY_A), hash_key(KEY_B)}
    a = rt.static_keys[hash_key(KEY_A)]
    assert a.id == "cfg:a" and a.models == frozenset({"m"}) and a.team == "t"
    assert rt.static_keys[hash_key(KEY_B)].models is None
    assert KEY_A not in repr(rt.static_keys)


def test_compile_absolute_data_dir_kept(tmp_path: Path) -> None:
    rt = compile_config(parse_config({"data_dir": str(tmp_path / "abs")}, env={}), base_dir=Path("/elsewhere"))
    assert rt.data_dir == tmp_path / "abs"


def test_compile_unknown_provider() -> None:
    cfg = good()
    cfg["models"]["m"]["deployments"][1]["provider"] = "azure"
    assert compile_problems(cfg) == ["models.m.deployments[1].provider: unknown provider 'azure' (known: oai, sim)"]


def test_compile_unknown_provider_with_none_defined() -> None:
    probs = compile_problems({"models": {"m": {"deployments": [{"provider": "p", "model": "x"}]}}})
    assert probs == ["models.m.deployments[0].provider: unknown provider 'p' (known: none defined)"]


def test_compile_key_references_unknown_model() -> None:
    cfg = good()
    cfg["keys"][0]["models"] = ["m", "gpt-5", "*"]
    assert compile_problems(cfg) == ["keys[0].models[1]: unknown model 'gpt-5'"]


def test_compile_duplicate_key_secret_and_name() -> None:
    cfg = good()
    cfg["keys"].append({"name": "c", "key": KEY_A})
    cfg["keys"].append({"name": "a", "key": "sk-test-cccccccccccccccc"})
    probs = compile_problems(cfg)
    assert "keys[2].key: the same secret is used by key 'a'" in probs
    assert "keys[3].name: duplicate key name 'a'" in probs
    assert not any(KEY_A in p for p in probs)  # the secret itself is never printed
    assert len(probs) == 2


def test_compile_reports_every_reference_error() -> None:
    cfg = good()
    cfg["models"]["m"]["deployments"][0]["provider"] = "nope1"
    cfg["models"]["e"]["deployments"][0]["provider"] = "nope2"
    cfg["keys"][0]["models"] = ["ghost"]
    cfg["keys"][1]["key"] = KEY_A
    probs = compile_problems(cfg)
    assert len(probs) == 4
    assert any(p.startswith("models.m.deployments[0].provider:") and "nope1" in p for p in probs)
    assert any(p.startswith("models.e.deployments[0].provider:") and "nope2" in p for p in probs)
    assert "keys[0].models[0]: unknown model 'ghost'" in probs
    assert "keys[1].key: the same secret is used by key 'a'" in probs
