"""`ui`'s config: the web page's workspace, address and login."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from .fields import _help, bad, check_numbers, require

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_auth(auth: str, host: str) -> tuple[str, str] | None:
    """``user:password`` as Gradio's auth pair; required for any host but
    this machine, since the page starts processes and writes files."""
    if not auth:
        if host not in LOCAL_HOSTS:
            raise UserError(f"--host {host}: serving beyond this machine needs --auth "
                            f"user:password (anyone who reaches the port could train, draw and "
                            f"write files in the workspace)")
        return None
    user, sep, password = auth.partition(":")
    if not (sep and user and password):
        raise UserError("--auth: expected user:password, both non-empty")
    return user, password



@dataclass(frozen=True)
class UiConfig:
    workspace: str = _help("The one folder the page reads and writes (photos, datasets, runs); "
                           "a path outside it, `..` or a symlink out of it is refused.",
                           "lorabooth-runs")
    host: str = _help("Address to listen on; any but 127.0.0.1, localhost or ::1 needs --auth.",
                      "127.0.0.1")
    port: int = _help("Port to listen on.", 7860)
    auth: str = _help("user:password the page asks for (required with a --host beyond this "
                      "machine).", "")
    model: str = _help("Base model the training form starts with (tiny, toy, a folder, a hub "
                       "id).", "tiny")
    max_upload_mb: int = _help("Largest photo the page accepts, in MB.", 25)

    def __post_init__(self) -> None:
        check_numbers(self)
        require(self, "workspace", "host", "model")
        if not 0 < self.port < 65536:
            raise bad(self, "port", "must be between 1 and 65535")
        if self.max_upload_mb < 1:
            raise bad(self, "max_upload_mb", "must be at least 1")
        parse_auth(self.auth, self.host)

