"""Log set-up for every aligngate process: text lines (the default) or JSON lines
(``--log-format json`` / ``ALIGNGATE_LOG_FORMAT=json``), one object per line, each record
logged while serving a request carrying that request's ``request_id``.

vLLM's loggers keep their own handler; in JSON mode they get this module's formatter too,
through vLLM's own ``VLLM_LOGGING_CONFIG_PATH`` (``vllm_json_logging.json``, written at the
gateway's level to the temporary folder), so the engine processes vLLM starts log JSON as
well. uvicorn's loggers go through the root handler. What
no logger writes (torch's C++ warnings, a library's progress bar, a child process's
``warnings``) reaches stderr too: in JSON mode stderr is a pipe whose lines that are not
JSON already become ``{"logger": "stderr", "message": LINE}`` (``JsonStderr``).

Owns: handlers, formatters and the request-id filter. Does not know: what is logged.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import fcntl
import json
import logging
import logging.config
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

from server.telemetry.request_ids import current_request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
VLLM_JSON_CONFIG = Path(__file__).with_name("vllm_json_logging.json")


class RequestIdFilter(logging.Filter):
    """Puts the request's id on records logged while serving it: ``request_id`` (JSON, and
    only then) and ``request_tag`` (`` [id]`` in text lines, empty outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonLineFormatter(JsonFormatter):
    """``{"time", "level", "logger", "message", "request_id"?, "exc_info"?, ...}``: one
    object per line (a message's newlines are escaped), extra fields kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            # `request_tag` is the text lines' form of `request_id`.
            reserved_attrs=[
                *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
                "request_tag",
            ],
        )


class JsonStderr:
    """File descriptor 2 of this process (and so of the processes it starts) as a pipe: a
    thread copies each line to the real stderr, as it is when it is a JSON object already,
    else wrapped in one. ``close`` puts the real stderr back and drains what is left.

    The copier never stops reading while the process lives (a line it cannot wrap goes as
    it is; a real stderr that fails is given up, the pipe still drained), so a writer never
    blocks or gets EPIPE. A fatal error's report (``faulthandler``) goes to the real stderr
    directly: the copier may not outlive the crash. The pipe holds 1 MiB where Linux allows.
    """

    def __init__(self) -> None:
        self._real = os.dup(2)  # the thread writes here
        self._restore = os.dup(2)  # fd 2 again at close
        self._fatal = os.fdopen(os.dup(2), "w")  # faulthandler's, unbuffered by it
        read_end, write_end = os.pipe()
        with contextlib.suppress(AttributeError, OSError):  # F_SETPIPE_SZ: Linux only
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)  # type: ignore[attr-defined]
        os.dup2(write_end, 2)
        os.close(write_end)
        faulthandler.enable(file=self._fatal)
        self._reader = os.fdopen(read_end, "rb")
        self._thread = threading.Thread(target=self._copy, name="json-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        real: Any = os.fdopen(self._real, "wb", buffering=0)
        with self._reader:
            for raw in self._reader:
                try:
                    line = json_line(raw.rstrip(b"\n"))
                except Exception:  # e.g. JSON nested past the recursion limit
                    line = raw.rstrip(b"\n")
                if real is None:
                    continue  # drained and dropped: the real stderr is gone
                try:
                    real.write(line + b"\n")
                except OSError:
                    real = None

    def close(self, timeout: float = 0.5) -> None:
        """The real stderr back on fd 2, then the pipe drained: it ends once the processes
        that inherited it (engine processes being stopped) have closed it too."""
        sys.stderr.flush()
        os.dup2(self._restore, 2)
        os.close(self._restore)
        self._thread.join(timeout)


def json_line(raw: bytes) -> bytes:
    """``raw`` when it is a JSON object, else a JSON object whose message it is."""
    text = raw.decode("utf-8", "replace")
    if text.startswith("{"):
        try:
            if isinstance(json.loads(text), dict):
                return raw
        except ValueError:
            pass
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "level": "WARNING" if "warn" in text.lower() else "INFO",
        "logger": "stderr",
        "message": text,
    }
    return json.dumps(record, ensure_ascii=False).encode()


_stderr: JsonStderr | None = None
_vllm_config: str | None = None  # the vLLM logging config this module wrote, if any


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """The root handler on stderr, in ``log_format``; in JSON mode vLLM's loggers too (here,
    and in the processes vLLM starts, unless ``VLLM_LOGGING_CONFIG_PATH`` is set already)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonLineFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if log_format != "json":
        return
    logging.captureWarnings(True)  # a library's warnings.warn: a JSON line, not raw text
    global _stderr
    if _stderr is None:
        _stderr = JsonStderr()
        atexit.register(_stderr.close)
    global _vllm_config
    configured = os.environ.get("VLLM_LOGGING_CONFIG_PATH")
    if configured is not None and configured != _vllm_config:
        return  # the operator's own vLLM logging config wins
    config = json.loads(VLLM_JSON_CONFIG.read_text())
    config["loggers"]["vllm"]["level"] = level.upper()  # vLLM's loggers at the gateway's level
    path = Path(tempfile.gettempdir()) / f"aligngate-vllm-logging-{level.upper()}.json"
    path.write_text(json.dumps(config))
    _vllm_config = os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    if "vllm.logger" in sys.modules:  # imported already: vLLM configured itself at import
        logging.config.dictConfig(config)
