"""The dashboard's aiohttp handlers: login/logout, five pages, JSON for the charts, static assets."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import jinja2
from markupsafe import Markup
import orjson
from aiohttp import web

from setpoint.dashboard import data
from setpoint.dashboard.auth import COOKIE_NAME, Session, SessionSigner
from setpoint.keys.model import key_matches
from setpoint.dashboard.fmt import FILTERS
from setpoint.errors import RequestError
from setpoint.logstore.reader import LogReader

if TYPE_CHECKING:
    from setpoint.proxy.gateway import Gateway

__all__ = ["Dashboard", "ReaderFactory"]

log = logging.getLogger("setpoint.dashboard")

_HERE = Path(__file__).parent
ReaderFactory = Callable[[], LogReader]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Everything the pages need is served from /ui/static: no inline script, no inline style, no CDN.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # not no-referrer: that makes browsers send `Origin: null` on POST
}
_NO_STORE = {"Cache-Control": "no-store", **_SECURITY_HEADERS}
_FAILED_LOGIN_DELAY_S = 0.25  # slows down guessing from one connection; the key itself is >= 16 chars
_PAGE_SIZE = 50


class _Static:
    """The package's static files, read once; served with a content hash for immutable caching."""

    def __init__(self, root: Path) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        digest = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            body = path.read_bytes()
            ctype = mimetypes.guess_type(rel)[0] or "application/octet-stream"
            if rel.endswith(".js"):
                ctype = "text/javascript"
            elif rel.endswith(".LICENSE"):
                ctype = "text/plain"
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self.files[rel] = (body, ctype, etag)
            digest.update(rel.encode() + b"\0" + body)
        self.version = digest.hexdigest()[:12]

    def url(self, name: str) -> str:
        if name not in self.files:
            raise KeyError(f"no static file {name!r}")
        return f"/ui/static/{self.version}/{name}"


class Dashboard:
    def __init__(self, gw: Gateway, reader_factory: ReaderFactory | None) -> None:
        self._gw = gw
        self._reader_factory = reader_factory
        self._reader: LogReader | None = None
        self._reader_lock = asyncio.Lock()
        master = gw.runtime.master_key
        self._signer = SessionSigner(master) if master else None
        self._static = _Static(_HERE / "static")
        self._now = gw.runtime.clock.now  # the clock the log's timestamps come from (virtual in tests)
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
        )
        self._env.filters.update(FILTERS)
        self._env.globals.update(static=self._static.url, qs=_qs)

    # -- wiring -----------------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ui", self._page(self.overview))
        r.add_get("/ui/", self._redirect_root)
        r.add_get("/ui/login", self.login_form)
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_get("/ui/budgets", self._page(self.budgets))
        r.add_get("/ui/deployments", self._page(self.deployments))
        r.add_get("/ui/requests", self._page(self.requests))
        r.add_get("/ui/requests/{request_id}", self._page(self.request_detail))
        r.add_get("/ui/api/summary", self._api(self.api_summary))
        r.add_get("/ui/api/series", self._api(self.api_series))
        r.add_get("/ui/api/budgets", self._api(self.api_budgets))
        r.add_get("/ui/api/deployments", self._api(self.api_deployments))
        r.add_get("/ui/api/requests", self._api(self.api_requests))
        r.add_get("/ui/api/requests/{request_id}", self._api(self.api_request))
        r.add_get("/ui/static/{version}/{name:.+}", self.static)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await asyncio.to_thread(reader.close)

    async def _get_reader(self) -> LogReader | None:
        if self._reader is None and self._reader_factory is not None:
            async with self._reader_lock:
                if self._reader is None:
                    self._reader = await asyncio.to_thread(self._reader_factory)
        return self._reader

    async def _read(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run a reader-backed function in a worker thread; 503 when no log reader is configured."""
        return (await self._read_all([lambda r: fn(r, *args, **kw)]))[0]

    async def _read_all(self, calls: list[data.Call]) -> list[Any]:
        """Independent reader calls, each in its own worker thread, at the same time."""
        try:
            reader = await self._get_reader()
            if reader is None:
                raise _Unavailable("the request log cannot be read (no log reader is configured)")
            return list(await asyncio.gather(*(asyncio.to_thread(c, reader) for c in calls)))
        except _Unavailable:
            raise
        except RequestError:
            raise  # the reader refused the question (e.g. a bad cursor): the caller says so
        except Exception as exc:  # the database is down (StateBackendError), locked, being migrated...
            log.exception("dashboard: reading the request log failed")
            raise _Unavailable(f"the request log could not be read ({type(exc).__name__}); see the gateway's log") from exc

    # -- auth -------------------------------------------------------------------------------------

    def _session(self, request: web.Request) -> Session | None:
        if self._signer is None:
            return None
        session = self._signer.verify(request.cookies.get(COOKIE_NAME))
        if session is None and request.path.startswith("/ui/api/"):
            value = request.headers.get("Authorization", "")  # scripts may use the admin API's header
            presented = value[7:].strip() if value[:7].lower() == "bearer " else ""
            if key_matches(presented, self._gw.runtime.master_key):
                session = Session("master", time.time(), time.time() + 60)
        return session

    def _page(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if self._session(request) is None:
                if self._signer is None:
                    return self._render("disabled.html", {}, status=403)
                target = request.path_qs
                raise web.HTTPSeeOther("/ui/login?" + urlencode({"next": target}), headers=_NO_STORE)
            try:
                return await handler(request)
            except _Unavailable as exc:
                return self._render("unavailable.html", {"title": "Unavailable", "message": str(exc)}, status=503)

        return wrapped

    def _api(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if self._session(request) is None:
                msg = "the dashboard is disabled: set admin.master_key" if self._signer is None else "log in first"
                return _json({"error": {"message": msg, "code": "unauthorized"}}, status=401)
            try:
                return await handler(request)
            except _Unavailable as exc:
                return _json({"error": {"message": str(exc), "code": "unavailable"}}, status=503)

        return wrapped

    async def _redirect_root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently("/ui")

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if self._signer is None:
            return self._render("disabled.html", {}, status=403)
        if self._session(request) is not None:
            raise web.HTTPSeeOther(_safe_next(request.query.get("next")), headers=_NO_STORE)
        return self._render("login.html", {"next": _safe_next(request.query.get("next")), "error": None})

    async def login(self, request: web.Request) -> web.StreamResponse:
        if self._signer is None:
            return self._render("disabled.html", {}, status=403)
        if not _same_origin(request):
            return self._render("login.html", {"next": "/ui", "error": "Cross-site login refused."}, status=403)
        form = await request.post()
        presented = form.get("key")
        nxt = _safe_next(str(form.get("next") or ""))
        if not isinstance(presented, str) or not key_matches(presented.strip(), self._gw.runtime.master_key):
            await asyncio.sleep(_FAILED_LOGIN_DELAY_S)
            log.warning("dashboard: failed login from %s", request.remote)
            return self._render("login.html", {"next": nxt, "error": "That key is not the admin key."}, status=401)
        resp = web.HTTPSeeOther(nxt, headers=_NO_STORE)
        resp.set_cookie(
            COOKIE_NAME, self._signer.issue("master"), max_age=int(self._signer.ttl_s), path="/ui",
            httponly=True, samesite="Strict", secure=_is_https(request),
        )
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return _json({"error": {"message": "cross-site request refused", "code": "forbidden"}}, status=403)
        resp = web.HTTPSeeOther("/ui/login", headers=_NO_STORE)
        resp.del_cookie(COOKIE_NAME, path="/ui")
        raise resp

    # -- pages ------------------------------------------------------------------------------------

    def _render(self, template: str, ctx: dict[str, Any], status: int = 200) -> web.Response:
        ctx.setdefault("title", "")
        ctx.setdefault("page", template.removesuffix(".html"))
        ctx.setdefault("authed", template not in ("login.html", "disabled.html"))
        ctx["now"] = self._now()
        body = self._env.get_template(template).render(ctx)
        return web.Response(body=body.encode(), status=status, content_type="text/html", charset="utf-8",
                            headers=_NO_STORE)

    async def overview(self, request: web.Request) -> web.StreamResponse:
        now = self._now()
        tr = data.time_range(request.query.get("range"), now)
        by = _by(request.query.get("by"))
        # Tiles and charts in one response (one round trip): all the reader calls at once.
        sc, cc = data.summary_calls(tr), data.series_calls(tr, by)
        answers = await self._read_all(sc + cc)
        summary = data.summary_data(tr, *answers[: len(sc)])
        series = data.series_data(tr, by, *answers[len(sc):])
        series_url = "/ui/api/series?" + urlencode({"range": tr.name, "by": by})
        return self._render("overview.html", {
            "title": "Overview", "page": "overview", "tr": tr, "by": by, "ranges": list(data.RANGES),
            "by_choices": data.BY_CHOICES, "s": summary, "series_url": series_url, "series_json": _script_json(series),
        })

    async def api_summary(self, request: web.Request) -> web.StreamResponse:
        tr = data.time_range(request.query.get("range"), self._now())
        return _json(data.summary_data(tr, *await self._read_all(data.summary_calls(tr))))

    async def api_series(self, request: web.Request) -> web.StreamResponse:
        tr = data.time_range(request.query.get("range"), self._now())
        by = _by(request.query.get("by"))
        return _json(data.series_data(tr, by, *await self._read_all(data.series_calls(tr, by))))

    async def _budgets(self) -> dict[str, Any]:
        now = self._now()
        rules = list(self._gw.runtime.config.budgets)
        if not rules:
            return data.budgets_data([], [], True, now)
        rows, notes = await self._read(data.budget_rows, rules, now)
        ok = await data.fill_ledger(rows, self._gw.runtime.state, now)
        return data.budgets_data(rows, notes, ok, now)

    async def budgets(self, request: web.Request) -> web.StreamResponse:
        return self._render("budgets.html", {"title": "Budgets", "page": "budgets", **await self._budgets()})

    async def api_budgets(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._budgets())

    async def _deployments(self) -> dict[str, Any]:
        try:
            traffic = await self._read(data.deployment_traffic, self._now())
        except _Unavailable:
            traffic = {}  # live state needs no log
        return data.deployments_data(self._gw, traffic)

    async def deployments(self, request: web.Request) -> web.StreamResponse:
        return self._render("deployments.html", {"title": "Deployments", "page": "deployments", "pid": os.getpid(),
                                                  **await self._deployments()})

    async def api_deployments(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._deployments())

    async def _search(self, request: web.Request) -> tuple[dict[str, Any], dict[str, str], list[str]]:
        flt, form, problems = data.parse_filter(request.query, self._now())
        cursor = request.query.get("cursor") or None
        try:
            page = await self._read(lambda r: r.search(flt, limit=_PAGE_SIZE, cursor=cursor))
        except RequestError as exc:  # e.g. a cursor that was tampered with
            problems.append(exc.message)
            page = None
        rows = page.rows if page is not None else []
        nxt = page.next_cursor if page is not None else None
        return {"rows": rows, "next_cursor": nxt}, form, problems

    async def requests(self, request: web.Request) -> web.StreamResponse:
        result, form, problems = await self._search(request)
        older = None
        if result["next_cursor"]:
            older = "/ui/requests?" + _qs({**form, "cursor": result["next_cursor"]})
        filtered = any(form.values())
        return self._render("requests.html", {
            "title": "Requests", "page": "requests", "form": form, "problems": problems, "rows": result["rows"],
            "older": older, "is_first_page": not request.query.get("cursor"), "filtered": filtered,
            "newest": "/ui/requests?" + _qs(form), "ranges": list(data.REQUEST_RANGES),
        }, status=400 if problems else 200)

    async def api_requests(self, request: web.Request) -> web.StreamResponse:
        result, form, problems = await self._search(request)
        if problems:
            return _json({"error": {"message": "; ".join(problems), "code": "invalid_filter"}}, status=400)
        return _json({"object": "list", "data": result["rows"], "next_cursor": result["next_cursor"],
                      "filter": {k: v for k, v in form.items() if v}})

    async def _get(self, request: web.Request) -> dict[str, Any] | None:
        rid = request.match_info["request_id"]
        if not rid or len(rid) > 200:
            return None
        return await self._read(lambda r: r.get(rid))  # type: ignore[no-any-return]

    async def request_detail(self, request: web.Request) -> web.StreamResponse:
        row = await self._get(request)
        if row is None:
            return self._render("not_found.html", {"title": "Not found", "page": "requests",
                                                   "what": request.match_info["request_id"]}, status=404)
        return self._render("request.html", {"title": f"Request {row.get('id')}", "page": "requests",
                                             "r": row, "view": _detail_view(row)})

    async def api_request(self, request: web.Request) -> web.StreamResponse:
        row = await self._get(request)
        if row is None:
            return _json({"error": {"message": "no such request", "code": "not_found"}}, status=404)
        return _json(row)

    async def static(self, request: web.Request) -> web.StreamResponse:
        hit = self._static.files.get(request.match_info["name"])
        if hit is None:
            raise web.HTTPNotFound()
        body, ctype, etag = hit
        immutable = request.match_info["version"] == self._static.version
        headers = {
            "ETag": etag, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "public, max-age=31536000, immutable" if immutable else "public, max-age=300",
        }
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers={**headers, "Content-Type": ctype})


class _Unavailable(Exception):
    pass


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), status=status,
                        content_type="application/json", headers=_NO_STORE)


def _script_json(obj: Any) -> Markup:
    """JSON for a `<script type="application/json">` data block: no `<` can end the element early."""
    return Markup(orjson.dumps(obj).decode().replace("<", "\\u003c"))


def _qs(params: dict[str, Any]) -> str:
    return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _by(value: str | None) -> data.Dimension:
    return value if value in data.BY_CHOICES else "team"  # type: ignore[return-value]


def _safe_next(value: str | None) -> str:
    """Only a path inside the dashboard (no open redirect to another site)."""
    if not value or not value.startswith("/ui") or value.startswith("//") or "\\" in value:
        return "/ui"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/ui"
    return value


def _is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _same_origin(request: web.Request) -> bool:
    """A POST from a page of another site is refused (with SameSite=Strict, belt and braces)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser form post (curl, scripts)
    return urlsplit(origin).netloc == request.host


def _detail_view(row: dict[str, Any]) -> dict[str, Any]:
    """The detail page's extra views: annotations and content pretty-printed, chat messages split."""
    ann = row.get("annotations")
    content = row.get("content")
    messages = None
    if isinstance(content, dict) and isinstance(content.get("request"), dict):
        msgs = content["request"].get("messages")
        if isinstance(msgs, list):
            messages = [
                {"role": str(m.get("role", "?")),
                 "text": m.get("content") if isinstance(m.get("content"), str) else _pretty(m.get("content"))}
                for m in msgs if isinstance(m, dict)
            ]
    return {
        "annotations": _pretty(ann) if ann else None,
        "content": _pretty(content) if content else None,
        "messages": messages,
        "output": content.get("output") if isinstance(content, dict) else None,
        "columns": [(k, v) for k, v in row.items() if k not in ("annotations", "content")],
    }


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
