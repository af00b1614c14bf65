"""`lorabooth ui`: check who may connect, open the workspace, find the jobs
an earlier server left, and serve the page. Local by default, no share
links, no analytics, no web fonts: the page makes no request beyond this
machine."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..config.ui import parse_auth
from .workspace import Workspace

log = logging.getLogger(__name__)


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, auth: str = "",
          model: str = "tiny", max_upload_mb: int = 25, block: bool = True) -> Any:
    credentials = parse_auth(auth, host)
    ws = Workspace.open(workspace, max_upload_mb << 20)
    # Before gradio is imported: it reads these once. Its file routes serve
    # every file under these two folders (uploads, and the copies of what
    # the page shows), so they are the page's own, whatever the environment says.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(ws.make_uploads())
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(ws.uploads / "examples")
    import fastapi
    import gradio as gr
    import uvicorn

    from .app import CSS, build
    from .jobs import JobQueue

    queue = JobQueue(ws)
    found = queue.recover()
    if found:
        log.info("found %d job(s) left by an earlier server", len(found))
    page = build(ws, queue, model)
    page.queue(default_concurrency_limit=4)
    # system fonts: the default theme would fetch Google's from the browser
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    # allowed_paths stays empty: a folder there is served whole, to anyone
    # who can name a file in it. What the page shows, ws.publish copies into
    # ws.uploads first. No run history: it can send every call to a Hub bucket.
    # Our own uvicorn in the main thread rather than launch(): launch gives
    # its server thread 5 s to start and gives up on a busy machine.
    app = gr.mount_gradio_app(
        fastapi.FastAPI(openapi_url=None, docs_url=None, redoc_url=None), page, path="",
        server_name=host, server_port=port, footer_links=[], auth=credentials,
        allowed_paths=[], show_error=False, max_file_size=max_upload_mb << 20,
        ssr_mode=False, enable_monitoring=False, pwa=False, mcp_server=False, run_history=False,
        theme=theme, css=CSS)
    where = f"workspace {ws.root}; serving on http://{host}:{port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # only now: a script waiting for this line knows the port answers
                log.info("%s", where)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if block:
        server.run()
    return server
