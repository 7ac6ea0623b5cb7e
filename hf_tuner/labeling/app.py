"""The label page: a Starlette app over a LabelSession, served by uvicorn on 127.0.0.1.

Plain HTML forms do the work (a judgment is a form post, answered with a redirect to the next item), so
the page works without JavaScript; label.js adds the keyboard. Model outputs are untrusted text:

- every piece of model text goes through Jinja2's autoescaping, and the Content-Security-Policy
  forbids inline scripts, so a `<script>` in an output is shown, never run;
- posts must be form-encoded, small, carry exactly the expected fields, and the token of a page this
  server rendered (so another web page open in the browser cannot post judgments);
- the Host header must name the loopback address, against DNS rebinding.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from hf_tuner.labeling.session import JudgmentError, LabelSession

HERE = Path(__file__).parent
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
STATIC = {"label.js": "text/javascript; charset=utf-8", "label.css": "text/css; charset=utf-8"}
MAX_BODY = 4096
FIELDS = {"rank": frozenset({"token", "item_id", "order"}), "ab": frozenset({"token", "item_id", "choice"})}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def host_name(header: str) -> str:
    """The host part of a Host header: "127.0.0.1:8765" -> "127.0.0.1", "[::1]:8765" -> "::1"."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def parse_form(body: bytes, expected: frozenset[str]) -> dict[str, str]:
    """Exactly the expected fields, each once, from a form-encoded body; JudgmentError(400) otherwise."""
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=16)
    except (UnicodeDecodeError, ValueError) as e:
        raise JudgmentError(400, f"malformed form data ({e})") from e
    unexpected = sorted(set(fields) - expected)
    if unexpected:
        raise JudgmentError(400, f"unexpected field(s): {', '.join(f[:30] for f in unexpected)}")
    missing = sorted(expected - set(fields))
    if missing:
        raise JudgmentError(400, f"missing field(s): {', '.join(missing)}")
    repeated = sorted(k for k, v in fields.items() if len(v) > 1)
    if repeated:
        raise JudgmentError(400, f"field(s) given more than once: {', '.join(repeated)}")
    return {k: v[0] for k, v in fields.items()}


def create_app(session: LabelSession, allowed_hosts: frozenset[str] | None = LOOPBACK) -> Starlette:
    """allowed_hosts: Host header names accepted (None: any, for a deliberate non-loopback bind)."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined)
    page = env.get_template("page.html")
    static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}

    def render(http_status: int = 200, **context) -> HTMLResponse:
        done, total = session.progress()
        html = page.render(mode=session.mode, annotator=session.annotator, done=done, total=total,
                           output=str(session.output), **context)
        return HTMLResponse(html, status_code=http_status, headers=HEADERS)

    def refuse(status: int, message: str) -> HTMLResponse:
        return render(status, view="error", status=status, message=message)

    def host_refused(request: Request) -> HTMLResponse | None:
        name = host_name(request.headers.get("host", ""))
        if allowed_hosts is not None and name not in allowed_hosts:
            return refuse(400, f"unexpected Host {name[:60]!r}: this page answers on the loopback address only")
        return None

    async def index(request: Request) -> Response:
        if (refused := host_refused(request)) is not None:
            return refused
        item = session.current()
        if item is None:
            return render(view="finished", **finished_context())
        shown = [item.responses[i] for i in session.layout(item)]
        kind = "pair" if len(shown) == 2 else "rank"
        return render(view="item", item=item, shown=shown, kind=kind, token=session.token)

    def finished_context() -> dict:
        judged = session.judged()
        rows = [r for item in session.items for r in judged.get(item.id, [])]
        if session.mode == "rank":
            ties = sum(bool(r.get("tie")) for r in rows)
            return {"pairs": len(rows) - ties, "ties": ties, "summary": None, "reveal": []}
        from hf_tuner.evaluation.human import summarize

        return {"pairs": 0, "ties": 0, "summary": summarize(rows),
                "reveal": [{"prompt": r["prompt"], "left": r["left"], "choice": r["choice"], "winner": r["winner"]}
                           for r in rows]}

    async def judge(request: Request) -> Response:
        if (refused := host_refused(request)) is not None:
            return refused
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            return refuse(415, f"expected a form post (application/x-www-form-urlencoded), got {ctype[:60]!r}")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return refuse(413, f"a judgment is at most {MAX_BODY} bytes")
        body = await request.body()
        if len(body) > MAX_BODY:
            return refuse(413, f"a judgment is at most {MAX_BODY} bytes")
        try:
            form = parse_form(body, FIELDS[session.mode])
            if form["token"] != session.token:
                raise JudgmentError(403, "this page is out of date (the server restarted?): reload it; "
                                         "nothing saved is lost")
            value = form["order"] if session.mode == "rank" else form["choice"]
            outcome = await run_in_threadpool(session.submit, form["item_id"], value)  # fsync blocks
        except JudgmentError as e:
            return refuse(e.status, str(e))
        return RedirectResponse("/", status_code=303, headers={**HEADERS, "X-Judgment": outcome})

    async def progress(request: Request) -> Response:
        if (refused := host_refused(request)) is not None:
            return refused
        done, total = session.progress()
        item = session.current()
        return JSONResponse({"mode": session.mode, "annotator": session.annotator, "done": done, "total": total,
                             "current": item.id if item else None, "finished": item is None}, headers=HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(static[name], media_type=STATIC[name], headers=HEADERS)

    return Starlette(routes=[Route("/", index, methods=["GET"]), Route("/judge", judge, methods=["POST"]),
                             Route("/api/progress", progress, methods=["GET"]),
                             Route("/static/{name}", asset, methods=["GET"])])


def serve(session: LabelSession, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the page until Ctrl-C. Binding anything but loopback is the user's explicit choice: warned about."""
    import uvicorn

    loopback = host in LOOPBACK
    if not loopback:
        print(f"warning: binding {host}: anyone who can reach this machine can read the outputs and post "
              "judgments; the Host check is off")
    done, total = session.progress()
    print(f"hf-tuner label {session.mode}: {total} items, {done} already judged by {session.annotator}; "
          f"judgments go to {session.output}\nopen http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          "(Ctrl-C stops; every judgment is already on disk)")
    uvicorn.run(create_app(session, LOOPBACK if loopback else None), host=host, port=port, log_level="warning")
