"""Virtual keys end to end: the admin HTTP API, the `setpoint keys` CLI against a served gateway,
and `setpoint config check`."""

from __future__ import annotations

import hashlib
import textwrap
from typing import Any

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def assert_error(resp: httpx.Response, status: int, code: str | None = None, hidden: tuple[str, ...] = ()) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code", "param"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code, err
    for secret in hidden:
        assert secret not in resp.text
    return err


# -- admin API ----------------------------------------------------------------------------------


@pytest.fixture
def admin(gateway, http, keys):
    """`admin(method, path="/admin/keys", **kw)` with the master key."""

    def call(method: str, path: str = "/admin/keys", **kw: Any) -> httpx.Response:
        return http.request(method, gateway.root_url + path, headers=bearer(keys.master), **kw)

    return call


def test_create_key_returns_secret_once_and_it_works(gateway, admin, make_client, gateway_rows) -> None:
    resp = admin("POST", json={"name": "svc", "team": "research", "user": "bob", "models": ["chat-a"],
                               "metadata": {"env": "test"}})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    secret = created["key"]
    assert secret.startswith("sk-sp-") and len(secret) > 30
    assert created["id"].startswith("key_")
    assert (created["name"], created["team"], created["user"], created["models"]) == ("svc", "research", "bob", ["chat-a"])
    assert secret.startswith(created["hint"].rstrip("…")) and created["hint"] != secret

    client = make_client(gateway.base_url, secret)
    out = client.chat.completions.create(model="chat-a", messages=MESSAGES)
    assert out.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["chat-a"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="chat-b", messages=MESSAGES)

    rows = gateway_rows(gateway)
    assert [(r["status"], r["key_id"], r["team"], r["user_id"]) for r in rows] == [
        (200, created["id"], "research", "bob"), (403, created["id"], "research", "bob")]


def test_list_never_contains_secrets_or_hashes(admin) -> None:
    secrets = [admin("POST", json={"name": f"k{i}"}).json()["key"] for i in range(3)]
    resp = admin("GET")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["object"] == "list"
    assert [k["name"] for k in doc["data"]] == ["k0", "k1", "k2"]
    for k in doc["data"]:
        assert set(k) >= {"id", "name", "hint", "team", "models", "revoked", "created_at"}
        assert "key" not in k and "key_hash" not in k
        assert k["models"] == ["*"] and k["revoked"] is False
    for s in secrets:
        assert s not in resp.text
        assert sha256(s) not in resp.text


def test_default_models_and_name(admin, gateway, make_client) -> None:
    created = admin("POST", json={}).json()
    assert created["name"] == "unnamed" and created["models"] == ["*"]
    ids = sorted(m.id for m in make_client(gateway.base_url, created["key"]).models.list())
    assert ids == ["chat-a", "chat-b", "embed"]


def test_revoke_takes_effect_immediately(gateway, admin, make_client) -> None:
    created = admin("POST", json={"name": "temp"}).json()
    client = make_client(gateway.base_url, created["key"])
    assert client.chat.completions.create(model="chat-a", messages=MESSAGES).choices  # now cached as valid

    resp = admin("DELETE", f"/admin/keys/{created['id']}")
    assert resp.status_code == 200
    assert resp.json() == {"id": created["id"], "revoked": True}

    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat-a", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    listed = {k["id"]: k for k in admin("GET").json()["data"]}
    assert listed[created["id"]]["revoked"] is True

    # Revoking again, or an unknown id: 404.
    assert_error(admin("DELETE", f"/admin/keys/{created['id']}"), 404, code="not_found")
    assert_error(admin("DELETE", "/admin/keys/key_doesnotexist"), 404, code="not_found")


def test_revoking_one_key_leaves_others(gateway, admin, make_client) -> None:
    a = admin("POST", json={"name": "a"}).json()
    b = admin("POST", json={"name": "b"}).json()
    assert admin("DELETE", f"/admin/keys/{a['id']}").status_code == 200
    assert make_client(gateway.base_url, b["key"]).chat.completions.create(model="chat-a", messages=MESSAGES).choices


@pytest.mark.parametrize("auth", [None, "Bearer wrong-master-key-000000000", "Basic bWFzdGVy", "Bearer "])
@pytest.mark.parametrize(("method", "path"), [("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/key_x")])
def test_wrong_or_missing_master_key_is_401(gateway, http, keys, auth, method, path) -> None:
    headers = {} if auth is None else {"Authorization": auth.rstrip()}
    resp = http.request(method, gateway.root_url + path, headers=headers, json={"name": "x"})
    err = assert_error(resp, 401, code="invalid_api_key", hidden=(keys.master, "wrong-master-key-000000000"))
    assert err["type"] == "authentication_error"


def test_virtual_key_is_not_a_master_key(gateway, http, keys) -> None:
    assert_error(http.get(gateway.root_url + "/admin/keys", headers=bearer(keys.all)), 401, hidden=(keys.all,))


def test_master_key_is_not_a_virtual_key(gateway, http, keys) -> None:
    resp = http.post(gateway.base_url + "/chat/completions", json={"model": "chat-a", "messages": MESSAGES},
                     headers=bearer(keys.master))
    assert_error(resp, 401, hidden=(keys.master,))


def test_admin_disabled_without_master_key(make_gateway, default_config, http, keys) -> None:
    cfg = default_config()
    del cfg["admin"]
    gw = make_gateway(cfg)
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"), ("DELETE", "/admin/keys/key_x")):
        for headers in ({}, bearer(keys.master)):
            resp = http.request(method, gw.root_url + path, headers=headers, json={"name": "x"})
            err = assert_error(resp, 403, code="permission_denied")
            assert "disabled" in err["message"]
    assert gw.server.gateway.key_store.list() == []


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (b'{"name": 5}', "name"),
        (b'{"team": ["a"]}', "team"),
        (b'{"user": {}}', "user"),
        (b'{"models": "chat-a"}', "models"),
        (b'{"models": [1]}', "models"),
        (b'{"models": [""]}', "models"),
        (b'{"models": ["no-such-model"]}', "models"),
        (b'{"metadata": ["a"]}', "metadata"),
        (b'{"metadata": {"a": 1}}', "metadata"),
        (b"\xff\xfe", None),
    ],
)
def test_bad_create_bodies_are_400(admin, raw: bytes, param: str | None) -> None:
    resp = admin("POST", content=raw)
    err = assert_error(resp, 400, code="invalid_request")
    if param is not None:
        assert err["param"] == param
    assert admin("GET").json()["data"] == [], "nothing was created"


# -- CLI: keys ----------------------------------------------------------------------------------


@pytest.fixture
def cli_config(write_config, default_config) -> Any:
    cfg = default_config()
    cfg["data_dir"] = "data"  # relative to the config file
    cfg["server"] = {"auth_cache_ttl_s": 0}  # revocations from the CLI (another process) apply at once
    return write_config(cfg, name="cli")


def _created_key(proc: Any) -> tuple[str, str]:
    """(secret, key id) from `setpoint keys create` output: the secret alone on stdout."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    secret = lines[0]
    key_id = next(w for w in proc.stderr.split() if w.startswith("key_"))
    return secret, key_id


def test_cli_keys_create_list_revoke_against_served_gateway(
    run_cli, serve_gateway, cli_config, make_client, read_rows
) -> None:
    created = run_cli("keys", "create", "--config", str(cli_config), "--name", "ci", "--team", "platform",
                      "--models", "chat-a,embed")
    secret, key_id = _created_key(created)
    assert secret.startswith("sk-sp-")
    assert secret not in created.stderr

    listed = run_cli("keys", "list", "--config", str(cli_config))
    assert listed.returncode == 0, listed.stderr
    assert key_id in listed.stdout and "platform" in listed.stdout and "active" in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    assert sha256(secret) not in listed.stdout + listed.stderr

    srv = serve_gateway(cli_config)
    client = make_client(srv.base_url, secret)
    assert client.chat.completions.create(model="chat-a", messages=MESSAGES).choices[0].message.content
    assert len(client.embeddings.create(model="embed", input="x").data) == 1
    assert sorted(m.id for m in client.models.list()) == ["chat-a", "embed"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="chat-b", messages=MESSAGES)

    revoked = run_cli("keys", "revoke", "--config", str(cli_config), key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert f"revoked {key_id}" in revoked.stdout
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat-a", messages=MESSAGES)

    again = run_cli("keys", "revoke", "--config", str(cli_config), key_id)
    assert again.returncode == 1
    assert "revoked" in run_cli("keys", "list", "--config", str(cli_config)).stdout

    assert srv.proc.terminate() == 0
    rows = read_rows(srv.db_path)
    assert [(r["status"], r["team"]) for r in rows] == [(200, "platform"), (200, "platform"), (403, "platform"), (401, None)]


def test_cli_keys_create_rejects_unknown_model(run_cli, cli_config) -> None:
    out = run_cli("keys", "create", "--config", str(cli_config), "--models", "chat-a,nope")
    assert out.returncode == 2
    assert "nope" in out.stderr
    assert out.stdout.strip() == "", "no key may be printed"
    assert "key_" not in run_cli("keys", "list", "--config", str(cli_config)).stdout


def test_cli_keys_with_invalid_config_exit_2(run_cli, write_config) -> None:
    bad = write_config({"server": {"bogus": 1}}, name="bad-keys")
    out = run_cli("keys", "create", "--config", str(bad))
    assert out.returncode == 2
    assert "server.bogus: unknown key" in out.stderr
    assert not out.stdout.strip()


# -- CLI: config check --------------------------------------------------------------------------


def test_config_check_good_file(run_cli, cli_config) -> None:
    out = run_cli("config", "check", str(cli_config))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert "1 providers, 3 models, 2 keys" in out.stdout


def test_config_check_reports_every_schema_error_with_its_path(run_cli, write_config) -> None:
    text = textwrap.dedent(
        """\
        server:
          port: 8080
          bogus: true
        providers:
          good:
            type: simulated
          weird:
            type: opena_compatible
            base_url: http://127.0.0.1:1/v1
          remote:
            type: openai_compatible
            base_url: ${SETPOINT_TEST_UNSET_URL}
            api_key: ${SETPOINT_TEST_UNSET_KEY}
            timeouts: {read_s: -1}
        models:
          m:
            deployments:
              - provider: good
                model: x
                surprise: 1
        keys:
          - name: short
            key: tooshort
        """
    )
    out = run_cli("config", "check", str(write_config(text, name="bad-schema")))
    assert out.returncode == 2
    err = out.stderr
    assert "invalid config" in err
    for expected in (
        "server.bogus: unknown key",
        "providers.weird: unknown provider type 'opena_compatible'",
        "providers.remote.base_url: environment variable SETPOINT_TEST_UNSET_URL is not set",
        "providers.remote.api_key: environment variable SETPOINT_TEST_UNSET_KEY is not set",
        "providers.remote.timeouts.read_s:",
        "models.m.deployments[0].surprise: unknown key",
        "keys[0].key:",
    ):
        assert expected in err, f"missing {expected!r} in:\n{err}"
    assert "ok" not in out.stdout


def test_config_check_reports_every_reference_error_with_its_path(run_cli, write_config) -> None:
    text = textwrap.dedent(
        """\
        providers:
          openai:
            type: openai_compatible
            base_url: http://127.0.0.1:1/v1
        models:
          m:
            deployments:
              - provider: openai
                model: a
              - provider: opena
                model: b
          n:
            deployments:
              - provider: nope
                model: c
        keys:
          - name: k
            key: sk-0123456789abcdef
            models: [m, ghost]
        """
    )
    out = run_cli("config", "check", str(write_config(text, name="bad-refs")))
    assert out.returncode == 2
    err = out.stderr
    for expected in (
        "models.m.deployments[1].provider: unknown provider 'opena'",
        "models.n.deployments[0].provider: unknown provider 'nope'",
        "keys[0].models[1]: unknown model 'ghost'",
    ):
        assert expected in err, f"missing {expected!r} in:\n{err}"


def test_config_check_env_interpolation(run_cli, write_config) -> None:
    text = "providers:\n  p:\n    type: openai_compatible\n    base_url: ${SETPOINT_TEST_URL}\n    api_key: ${SETPOINT_TEST_KEY:-fallback}\n"
    path = write_config(text, name="env")
    assert run_cli("config", "check", str(path), env={"SETPOINT_TEST_URL": "http://127.0.0.1:9/v1"}).returncode == 0
    missing = run_cli("config", "check", str(path))
    assert missing.returncode == 2
    assert "providers.p.base_url: environment variable SETPOINT_TEST_URL is not set" in missing.stderr
    assert "SETPOINT_TEST_KEY" not in missing.stderr  # it has a default


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read config file"), ("models: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "mapping")],
)
def test_config_check_unreadable_files(run_cli, tmp_path, content, message) -> None:
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    out = run_cli("config", "check", str(path))
    assert out.returncode == 2
    assert message in out.stderr
