"""Log set-up for every aligngate process: text lines (the default) or JSON lines
(``--log-format json`` / ``ALIGNGATE_LOG_FORMAT=json``), one object per line, each record
logged while serving a request carrying that request's ``request_id``.

vLLM's loggers keep their own handler; in JSON mode they get this module's formatter too,
through vLLM's own ``VLLM_LOGGING_CONFIG_PATH`` (``vllm_json_logging.json``), so the engine
processes vLLM starts log JSON as well. uvicorn's loggers go through the root handler. What
no logger writes (torch's C++ warnings, a library's progress bar, a child process's
``warnings``) reaches stderr too: in JSON mode stderr is a pipe whose lines that are not
JSON already become ``{"logger": "stderr", "message": LINE}`` (``JsonStderr``).

Owns: handlers, formatters and the request-id filter. Does not know: what is logged.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.config
import os
import sys
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
    else wrapped in one. ``close`` puts the real stderr back and drains what is left."""

    def __init__(self) -> None:
        self._real = os.dup(2)  # the thread writes here
        self._restore = os.dup(2)  # fd 2 again at close
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = os.fdopen(read_end, "rb")
        self._thread = threading.Thread(target=self._copy, name="json-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with os.fdopen(self._real, "wb", buffering=0) as real, self._reader:
            for raw in self._reader:
                real.write(json_line(raw.rstrip(b"\n")) + b"\n")

    def close(self, timeout: float = 2.0) -> None:
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
    if os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_JSON_CONFIG)) != str(
        VLLM_JSON_CONFIG
    ):
        return  # the operator's own vLLM logging config wins
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    if "vllm.logger" in sys.modules:  # imported already: vLLM configured itself at import
        logging.config.dictConfig(json.loads(VLLM_JSON_CONFIG.read_text()))
