"""`finqlora ui`: one local web app with three pages, served by FastAPI.

* **对比 / Compare** (`/compare`): the page streams one prompt to the base model and to a
  fine-tuned adapter side by side. The answers come from the OpenAI-compatible API of
  `finqlora.serve.server`, mounted at `/llm` over the same `ServingEngine` (one base, every
  adapter), so the UI and `finqlora serve` generate the same way. An optional third column
  asks the DeepSeek API through `finqlora.models.client.FinLLMClient`, proxied by this app so
  that the browser talks to 127.0.0.1 only.
* **运行 / Runs** (`/runs`, `/runs/NAME`): stage status, live progress, loss curve, metrics
  with CIs, dataset card and report.html of each run folder; `finqlora run` can be started.
* **盲评 / Blind rating** (`/rating` for the owner, `/rate/TOKEN` for a rater): rounds stored
  by `finqlora.evaluate.ratings`.

Access: the owner's token (printed at start as a `/login?token=...` link, then kept in an
HttpOnly, SameSite=Strict cookie; scripts may send `Authorization: Bearer TOKEN`) is needed for
every page and API that runs jobs or reads results. A rater's token, in their link, opens only
their round's page and its two API calls. Runs are addressed by name from a fixed list, so no
request can name a path. Pages load nothing from other hosts (the CSP says so too).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from finqlora.core.config import MAX_NEW_TOKENS
from finqlora.core.errors import FinqloraError
from finqlora.evaluate import ratings as R
from finqlora.pipeline.engine import RunPaths
from finqlora.serve.http_limits import HostGuard, HTTPLimits, RequestBodyGuard
from finqlora.serve.text_fields import UnicodeText
from finqlora.ui import runs as run_info
from finqlora.ui.jobs import JobManager
from finqlora.ui.texts import PRESETS, texts

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
OWNER_COOKIE = "finqlora_owner"
# Everything from this origin only: no CDN script, font or analytics call can load.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
# report.html is a self-contained file with inline CSS and images and no scripts.
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"


@dataclass
class UIState:
    owner_token: str
    runs_root: Path
    explicit_runs: dict[str, Path]
    workdir: Path
    engine: Any = None  # finqlora.serve.server.ServingEngine, or None without a model
    deepseek: Any = None  # finqlora.models.client.FinLLMClient, or None without a key
    jobs: JobManager = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = JobManager(self.workdir)

    def run_dirs(self) -> dict[str, Path]:
        """Known runs by name: the --run folders, then every run folder under the runs root."""
        found = dict(self.explicit_runs)
        if self.runs_root.is_dir():
            for folder in sorted(self.runs_root.iterdir()):
                if folder.name not in found and run_info.is_run_folder(folder):
                    found[folder.name] = folder
        return found

    def run_dir(self, name: str) -> Path:
        folder = self.run_dirs().get(name)
        if folder is None:
            raise HTTPException(404, f"no run named {name!r}")
        return folder

    def find_rater(self, token: str) -> tuple[R.RatingRound, str]:
        for run_dir in self.run_dirs().values():
            # A damaged round must not lock the raters of every other round out; the owner's
            # rating page lists it (`/api/rounds`), and the log names it.
            for rating_round in R.list_rounds(run_dir, on_error=_log_broken_round):
                rater = rating_round.rater_for_token(token)
                if rater is not None:
                    return rating_round, rater
        raise HTTPException(404, "this rating link is not valid (ask the owner for a new one)")


def _log_broken_round(error: R.RatingFileError) -> None:
    log.warning("skipping a rating round: %s", error.message)


class StartRun(BaseModel):
    config: str


class NewRound(BaseModel):
    run: str
    raters: list[str]
    limit: int | None = Field(None, ge=1)
    name: str | None = None
    seed: int = 0


class AnswerScores(BaseModel):
    professional: int | None = None
    accuracy: int | None = None


class RatingBody(BaseModel):
    item: str
    choice: str
    scores: dict[str, AnswerScores]


class DeepSeekBody(BaseModel):
    prompt: UnicodeText = Field(min_length=1, max_length=8000)
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(MAX_NEW_TOKENS, ge=1, le=4096)


def _lang(request: Request) -> str:
    return "en" if (request.query_params.get("lang") or request.cookies.get("finqlora_lang")) == "en" else "zh"


def _is_owner(request: Request, owner_token: str) -> bool:
    given = request.cookies.get(OWNER_COOKIE, "")
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = bearer.strip()
    return bool(given) and hmac.compare_digest(given.encode(), owner_token.encode())


class OwnerCookieToBearer:
    """ASGI wrapper for the mounted API: the owner's cookie stands for its bearer token, and
    every path needs one or the other (the API's own /docs, /openapi.json and /health are
    open on `finqlora serve`, but here they are the owner's like every other page)."""

    def __init__(self, app: Any, owner_token: str) -> None:
        self.app, self.owner_token = app, owner_token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if not _is_owner(Request(scope), self.owner_token):
                from finqlora.serve.api_errors import APIError

                error = APIError(401, "the owner's token is needed (log in through the link `finqlora ui` printed)",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
            if not any(name == b"authorization" for name, _ in scope["headers"]):  # the cookie, then
                scope = {**scope, "headers": [*scope["headers"], (b"authorization", f"Bearer {self.owner_token}".encode())]}
        await self.app(scope, receive, send)


def create_ui_app(state: UIState, *, allowed_hosts: list[str] | None = None, http_limits: HTTPLimits | None = None) -> FastAPI:
    """The app over `state`; `allowed_hosts` guards against DNS rebinding (None = any; see
    `finqlora.serve.http_limits.allowed_hosts_for`); `http_limits` bounds every request's body
    (default 1 MiB and 30 s, what the mounted API takes too)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.jobs.stop_all()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="finqlora ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state
    # In front of every route, the mounted API's included, and before any route or
    # dependency reads the body: a body must be JSON, and is read within the limits or refused.
    app.add_middleware(RequestBodyGuard, limits=http_limits or HTTPLimits())
    if allowed_hosts:
        app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)  # outside the body guard: no body read for a foreign Host

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.exception_handler(FinqloraError)
    async def _finqlora_error(_: Request, exc: FinqloraError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which fails to encode (a 500) when it holds a
        # lone surrogate; say where and what instead, in text that always encodes.
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request"))
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        return JSONResponse({"error": message, "hint": "reload the page and try again"}, status_code=422)

    @app.exception_handler(R.RatingFileError)
    async def _rating_file_error(request: Request, exc: R.RatingFileError) -> JSONResponse:
        # A stored file is damaged or cannot be written: the server's problem (503), and its
        # path is the owner's business, not a rater's.
        log.warning("%s", exc.message)
        if _is_owner(request, state.owner_token):
            return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=503)
        return JSONResponse({"error": "this rating round's files cannot be read or saved right now",
                             "hint": "tell the owner of the round (the app's log names the file); your earlier ratings are kept"}, status_code=503)

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    if state.engine is not None:
        from finqlora.serve.server import create_app

        api = create_app(state.engine, api_key=state.owner_token, shutdown_engine=False, allowed_hosts=None)  # checked above
        app.mount("/llm", OwnerCookieToBearer(api, state.owner_token))
    _page_routes(app, state, templates)
    _run_routes(app, state)
    _rating_routes(app, state)
    _rater_routes(app, state, templates)
    return app


def _page_routes(app: FastAPI, state: UIState, templates: Jinja2Templates) -> None:
    def owner_page(request: Request, template: str, status: int = 200, **extra: Any) -> HTMLResponse:
        lang = _lang(request)
        if not _is_owner(request, state.owner_token):
            template, status = "forbidden.html", 403
        context = {"t": texts(lang), "lang": lang, "texts_json": json.dumps(texts(lang), ensure_ascii=False), **extra}
        response = templates.TemplateResponse(request, template, context, status_code=status)
        if request.query_params.get("lang") in ("en", "zh"):
            response.set_cookie("finqlora_lang", request.query_params["lang"], samesite="strict", httponly=True)
        return response

    @app.get("/login")
    async def login(token: str = "") -> RedirectResponse:
        if not token or not hmac.compare_digest(token.encode(), state.owner_token.encode()):
            raise HTTPException(403, "wrong owner token")
        response = RedirectResponse("/compare", status_code=303)
        response.set_cookie(OWNER_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.get("/")
    async def index() -> RedirectResponse:
        return RedirectResponse("/compare", status_code=303)

    @app.get("/compare", response_class=HTMLResponse)
    async def compare(request: Request) -> HTMLResponse:
        engine = state.engine
        models = {"base": engine.base_name if engine else None, "adapters": list(engine.adapters) if engine else []}
        return owner_page(request, "compare.html", page="compare", presets=PRESETS, models=models,
                          models_json=json.dumps(models), deepseek=state.deepseek is not None)

    @app.get("/runs", response_class=HTMLResponse)
    async def runs_page(request: Request) -> HTMLResponse:
        return owner_page(request, "runs.html", page="runs")

    @app.get("/runs/{name}", response_class=HTMLResponse)
    async def run_page(request: Request, name: str) -> HTMLResponse:
        if _is_owner(request, state.owner_token):
            state.run_dir(name)
        return owner_page(request, "run.html", page="runs", run_name=name)

    @app.get("/rating", response_class=HTMLResponse)
    async def rating_page(request: Request) -> HTMLResponse:
        return owner_page(request, "rating.html", page="rating")


def _owner(request: Request) -> UIState:
    state: UIState = request.app.state.ui
    if not _is_owner(request, state.owner_token):
        raise HTTPException(403, "owner token required")
    return state


def _run_routes(app: FastAPI, state: UIState) -> None:
    @app.get("/api/runs")
    async def list_runs(owner: UIState = Depends(_owner)) -> dict[str, Any]:
        dirs = owner.run_dirs()
        jobs = [job.to_dict() for job in owner.jobs.jobs]
        return {"runs": [run_info.run_overview(name, folder) for name, folder in dirs.items()],
                "configs": owner.jobs.configs(dirs), "jobs": jobs}

    @app.get("/api/runs/{name}")
    async def get_run(name: str, request: Request, owner: UIState = Depends(_owner)) -> dict[str, Any]:
        folder = owner.run_dir(name)
        detail = run_info.run_detail(name, folder, _lang(request))
        job = owner.jobs.for_run(folder)
        detail["job"] = job.to_dict() if job else None
        return detail

    @app.get("/runs/{name}/report.html")
    async def report(name: str, owner: UIState = Depends(_owner)) -> FileResponse:
        path = RunPaths(owner.run_dir(name)).report_dir / "report.html"
        if not path.is_file():
            raise HTTPException(404, f"run {name!r} has no report yet (the report stage writes it)")
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_CSP})

    @app.post("/api/jobs")
    async def start_job(body: StartRun, owner: UIState = Depends(_owner)) -> dict[str, Any]:
        job = owner.jobs.start(body.config, owner.run_dirs())
        if job.run_name not in owner.explicit_runs and job.run_dir.parent.resolve() != owner.runs_root.resolve():
            owner.explicit_runs[job.run_name] = job.run_dir  # a config writing outside runs/ is still watched
        return job.to_dict()

    @app.post("/api/deepseek")
    async def deepseek(body: DeepSeekBody, owner: UIState = Depends(_owner)) -> StreamingResponse:
        if owner.deepseek is None:
            raise HTTPException(404, "no DeepSeek key configured (set DEEPSEEK_API_KEY before `finqlora ui`)")
        return StreamingResponse(_deepseek_events(owner.deepseek, body), media_type="text/event-stream")


def _deepseek_events(client: Any, body: DeepSeekBody) -> Any:
    """OpenAI-style SSE chunks from the DeepSeek stream (a sync generator: Starlette threads it)."""
    try:
        for piece in client.stream([{"role": "user", "content": body.prompt}], temperature=body.temperature, max_tokens=body.max_tokens):
            yield "data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}, ensure_ascii=False) + "\n\n"
    except FinqloraError as exc:
        yield "data: " + json.dumps({"error": {"message": exc.message}}, ensure_ascii=False) + "\n\n"
    yield "data: [DONE]\n\n"


def _rating_routes(app: FastAPI, state: UIState) -> None:
    @app.get("/api/rounds")
    async def rounds(request: Request, owner: UIState = Depends(_owner)) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        listed, rateable, broken = [], [], []
        for name, folder in owner.run_dirs().items():
            eval_dir = run_info.eval_dir_of(folder)
            if eval_dir is not None and (eval_dir / "generations_finetuned.jsonl").is_file():
                rateable.append(name)
            for rating_round in R.list_rounds(folder, on_error=lambda error: broken.append({"error": error.message, "hint": error.hint})):
                try:
                    summary = R.summarize_round(rating_round)
                except R.RatingFileError as error:  # a rater's file: list the round as damaged, keep the others
                    broken.append({"error": error.message, "hint": error.hint})
                    continue
                summary["run"] = name
                summary["links"] = {rater: f"{base}/rate/{entry['token']}" for rater, entry in rating_round.raters.items()}
                listed.append(summary)
        return {"rounds": listed, "rateable_runs": rateable, "broken_rounds": broken}

    @app.post("/api/rounds")
    async def new_round(request: Request, body: NewRound, owner: UIState = Depends(_owner)) -> dict[str, Any]:
        folder = owner.run_dir(body.run)
        eval_dir = run_info.eval_dir_of(folder)
        if eval_dir is None:
            raise FinqloraError(f"run {body.run!r} has no evaluation folder", hint="run the evaluation of both models first")
        created = R.create_round(eval_dir, body.raters, name=body.name or None, limit=body.limit, seed=body.seed)
        base = str(request.base_url).rstrip("/")
        return {"round": created.name, "run": body.run, "pairs": len(created.pairs),
                "links": {rater: f"{base}/rate/{entry['token']}" for rater, entry in created.raters.items()}}


def _rater_routes(app: FastAPI, state: UIState, templates: Jinja2Templates) -> None:
    @app.get("/rate/{token}", response_class=HTMLResponse)
    async def rate_page(request: Request, token: str) -> HTMLResponse:
        rating_round, rater = state.find_rater(token)
        lang = _lang(request)
        context = {"t": texts(lang), "lang": lang, "texts_json": json.dumps(texts(lang), ensure_ascii=False),
                   "rater": rater, "round_name": rating_round.name, "page": "rate"}
        return templates.TemplateResponse(request, "rate.html", context)

    @app.get("/api/rate/{token}")
    async def rater_pairs(token: str) -> dict[str, Any]:
        rating_round, rater = state.find_rater(token)
        done = R.load_ratings(rating_round, rater)
        shown = rating_round.shown_pairs(rater)
        for pair in shown:
            record = done.get(pair["item"])
            if record is not None:
                models = {"A": record["a_is"], "B": "finetuned" if record["a_is"] == "base" else "base"}
                pair["rating"] = {"choice": record["choice"], "scores": {side: record["scores"][models[side]] for side in ("A", "B")}}
        return {"round": rating_round.name, "rater": rater, "pairs": shown}

    # `async def` on purpose: the read-modify-write of the rater's file runs on the event loop
    # without an await inside, so two quick submissions cannot interleave and lose one.
    @app.post("/api/rate/{token}")
    async def rate(token: str, body: RatingBody) -> dict[str, Any]:
        rating_round, rater = state.find_rater(token)
        scores = {side: value.model_dump() for side, value in body.scores.items()}
        R.save_rating(rating_round, rater, body.item, body.choice, scores)
        return {"saved": body.item, "rated": len(R.load_ratings(rating_round, rater)), "pairs": len(rating_round.pairs)}
