"""Dashboard login: the master key once, then a signed session cookie; nothing without it."""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from setpoint.dashboard.auth import COOKIE_NAME, SessionSigner

from .conftest import login

PAGES = ["/ui", "/ui/budgets", "/ui/deployments", "/ui/requests", "/ui/requests/req_whatever"]
APIS = ["/ui/api/summary", "/ui/api/series", "/ui/api/budgets", "/ui/api/deployments", "/ui/api/requests",
        "/ui/api/requests/req_whatever"]


def test_pages_redirect_to_login_and_api_answers_401(seeded_gateway, anon) -> None:
    c = anon(seeded_gateway)
    for path in PAGES:
        r = c.get(path + "?range=7d")
        assert r.status_code == 303, path
        loc = urlsplit(r.headers["location"])
        assert loc.path == "/ui/login"
        assert parse_qs(loc.query)["next"] == [path + "?range=7d"]  # back to the same page after login
    for path in APIS:
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "unauthorized"
    page = c.get("/ui/login")
    assert page.status_code == 200 and 'type="password"' in page.text


def test_login_sets_a_strict_httponly_session_cookie(seeded_gateway, anon, keys) -> None:
    c = anon(seeded_gateway)
    r = c.post("/ui/login", data={"key": keys.master, "next": "/ui/budgets"}, headers={"Origin": seeded_gateway.root_url})
    assert r.status_code == 303 and r.headers["location"] == "/ui/budgets"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="):
        assert attr in cookie
    assert keys.master not in cookie
    assert "Secure" not in cookie  # plain http here; set behind https (X-Forwarded-Proto)
    assert c.get("/ui/budgets").status_code == 200
    r = c.post("/ui/login", data={"key": keys.master}, headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in r.headers["set-cookie"]


@pytest.mark.parametrize("key", ["", "wrong-key-0123456789", "mk-test-master-key-012345678", "sk-test-all-models-0123456789"])
def test_wrong_key_is_refused(seeded_gateway, anon, key) -> None:
    c = anon(seeded_gateway)
    r = login(c, seeded_gateway.root_url, key)
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert "not the admin key" in r.text
    if key:
        assert key not in r.text  # never rendered back
    assert c.get("/ui").status_code == 303


def test_api_accepts_the_admin_bearer_header(seeded_gateway, anon, keys) -> None:
    c = anon(seeded_gateway)
    assert c.get("/ui/api/summary", headers={"Authorization": f"Bearer {keys.master}"}).status_code == 200
    assert c.get("/ui/api/summary", headers={"Authorization": f"Bearer {keys.all}"}).status_code == 401
    # ...but pages want the cookie (a bearer header is not how a browser logs in)
    assert c.get("/ui", headers={"Authorization": f"Bearer {keys.master}"}).status_code == 303


def _tamper(cookie: str) -> list[str]:
    payload, sig = cookie.split(".")
    data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(orjson.dumps({**data, "exp": data["exp"] + 10 ** 6})).rstrip(b"=").decode()
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    return [f"{forged}.{sig}", f"{payload}.{flipped}", payload, f"{payload}.", f".{sig}", "garbage", cookie + "x",
            f"{payload}.{sig}.{sig}"]


def test_tampered_or_forged_cookies_are_refused(seeded_gateway, anon, ui) -> None:
    good = ui(seeded_gateway).cookies[COOKIE_NAME]
    other_key = SessionSigner("another-master-key-0123456789").issue("master")
    for bad in [*_tamper(good), other_key]:
        c = anon(seeded_gateway)
        c.cookies.set(COOKIE_NAME, bad)
        assert c.get("/ui").status_code == 303, bad
        assert c.get("/ui/api/summary").status_code == 401, bad


def test_signer_expiry_and_key_derivation() -> None:
    s = SessionSigner("mk-test-master-key-0123456789", ttl_s=60)
    now = time.time()
    token = s.issue("master", now=now)
    assert s.verify(token, now=now + 30) is not None
    assert s.verify(token, now=now + 61) is None  # expired
    assert s.verify(s.issue("master", now=now + 3600), now=now) is None  # issued in the future
    assert SessionSigner("mk-test-master-key-0123456789").verify(token, now=now + 1) is not None  # any worker
    assert SessionSigner("mk-other-master-key-012345678").verify(token, now=now + 1) is None
    assert "mk-test-master-key" not in token


def test_logout_clears_the_cookie_and_is_post_only(seeded_gateway, ui) -> None:
    c = ui(seeded_gateway)
    assert c.get("/ui").status_code == 200
    assert c.get("/ui/logout").status_code == 405  # GET cannot log anyone out (no CSRF via links)
    r = c.post("/ui/logout", headers={"Origin": seeded_gateway.root_url})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert f'{COOKIE_NAME}=""' in r.headers["set-cookie"] and "Max-Age=0" in r.headers["set-cookie"]
    assert c.get("/ui").status_code == 303


def test_cross_site_posts_are_refused(seeded_gateway, anon, ui, keys) -> None:
    c = anon(seeded_gateway)
    r = c.post("/ui/login", data={"key": keys.master}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    r = c.post("/ui/login", data={"key": keys.master}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    logged_in = ui(seeded_gateway)
    r = logged_in.post("/ui/logout", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert logged_in.get("/ui").status_code == 200


@pytest.mark.parametrize("nxt", ["https://evil.example/", "//evil.example/ui", "/admin/keys", "/ui\\@evil", ""])
def test_login_never_redirects_off_the_dashboard(seeded_gateway, anon, keys, nxt) -> None:
    c = anon(seeded_gateway)
    r = c.post("/ui/login", data={"key": keys.master, "next": nxt})
    assert r.status_code == 303 and r.headers["location"] == "/ui"


def test_no_master_key_disables_the_dashboard(make_gateway, default_config, anon) -> None:
    cfg = default_config()
    cfg["admin"] = {}
    gw = make_gateway(cfg)
    c = anon(gw)
    assert c.get("/ui").status_code == 403
    assert "admin.master_key" in c.get("/ui/login").text
    assert c.post("/ui/login", data={"key": "anything-0123456789"}).status_code == 403
    assert c.get("/ui/api/summary").status_code == 401


def test_no_secret_appears_in_any_page(seeded_gateway, ui, keys) -> None:
    c = ui(seeded_gateway)
    rid = c.get("/ui/api/requests").json()["data"][0]["id"]
    paths = ["/ui", "/ui?range=1h&by=key", "/ui/budgets", "/ui/deployments", "/ui/requests", f"/ui/requests/{rid}",
             "/ui/login", *APIS]
    for path in paths:
        r = c.get(path)
        for secret in (keys.master, keys.all, keys.limited):
            assert secret not in r.text, (path, secret)


def test_security_headers(seeded_gateway, ui) -> None:
    c = ui(seeded_gateway)
    for path in ("/ui", "/ui/requests", "/ui/api/series", "/ui/login"):
        r = c.get(path)
        assert r.headers["cache-control"] == "no-store", path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.slow
def test_a_session_from_one_worker_is_accepted_by_the_others(serve_gateway, default_config, keys) -> None:
    """`setpoint serve --workers 2`: the cookie is signed with a key derived from the master key, so
    whichever worker answers (SO_REUSEPORT spreads new connections) accepts it."""
    import re

    import httpx

    srv = serve_gateway(default_config(), workers=2)
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # a new connection, maybe another worker, each time
    with httpx.Client(base_url=srv.root_url, timeout=20, trust_env=False, limits=no_reuse) as c:
        assert login(c, srv.root_url, keys.master).status_code == 303
        pids = set()
        # /health answered once the first worker listened; the second may still be starting
        deadline = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < deadline:
            r = c.get("/ui/deployments")
            assert r.status_code == 200
            pids.add(re.search(r"pid (\d+)", r.text).group(1))
            time.sleep(0.02)
    assert len(pids) == 2, "every request went to the same worker"
