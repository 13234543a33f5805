"""Python binding of libchat, chatd's LLM chat engine, through its C ABI (include/libchat.h).

Pure ctypes: `import libchat` loads libchat.so from, in this order, the file named by
LIBCHAT_PATH (when set, the only place looked at, so that a wrong path is reported rather than
silently replaced by another copy), libchat.so or libchat.so.0 in this package's folder,
`ctypes.util.find_library("chat")`, and finally the loader's search path (libchat.so.0).

    import libchat
    with libchat.Engine({"model": "models/smollm2-135m-instruct-genai"}) as engine:
        reply = engine.chat({"messages": [{"role": "user", "content": "Hi!"}]})
        for piece in engine.stream({"messages": [{"role": "user", "content": "Hi!"}]}):
            print(piece, end="")

Requests and responses are the OpenAI JSON objects of chatd's HTTP API, as dicts. An Engine
may be used by any number of threads at once: ctypes releases the GIL during each call, and
libchat batches concurrent requests together.
"""

import ctypes
import ctypes.util
import enum
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

__version__ = "0.1.0"
__all__ = ["ChatError", "Engine", "Status", "Stream", "version"]

Json = Union[Dict[str, Any], str]


def _load_library() -> ctypes.CDLL:
    """Loads libchat.so; the ImportError lists every place tried and why each failed."""
    explicit = os.environ.get("LIBCHAT_PATH")
    if explicit:
        candidates = [explicit]
    else:
        here = Path(__file__).resolve().parent
        found = ctypes.util.find_library("chat")
        candidates = [str(here / "libchat.so"), str(here / "libchat.so.0"), found, "libchat.so.0"]
    tried = []
    for candidate in candidates:
        if candidate is None:
            tried.append('ctypes.util.find_library("chat") found nothing')
            continue
        try:
            return ctypes.CDLL(candidate)
        except OSError as e:
            tried.append(str(e))  # names the file
    raise ImportError(
        "cannot load libchat; tried:\n  " + "\n  ".join(tried) + "\nSet LIBCHAT_PATH to the path of libchat.so."
    )


_lib = _load_library()

# bool (*chat_delta_fn)(void *userdata, const char *text, size_t len). `text` is a c_void_p,
# not a c_char_p, so that ctypes does not copy it up to a NUL: string_at reads `len` bytes.
_DELTA_FN = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

# Returned strings are kept as raw pointers (c_void_p), not c_char_p: ctypes would copy a
# c_char_p into bytes and lose the pointer that chat_string_free needs.
_OUT = ctypes.POINTER(ctypes.c_void_p)
for _name, _restype, _argtypes in [
    ("chat_engine_new", ctypes.c_int, [ctypes.c_char_p, _OUT]),
    ("chat_engine_free", None, [ctypes.c_void_p]),
    ("chat_engine_chat", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, _OUT]),
    ("chat_engine_chat_stream", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, _DELTA_FN, ctypes.c_void_p, _OUT]),
    ("chat_engine_complete", ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, _OUT]),
    ("chat_string_free", None, [ctypes.c_void_p]),
    ("chat_last_error", ctypes.c_size_t, [ctypes.c_char_p, ctypes.c_size_t]),
    ("chat_status_str", ctypes.c_char_p, [ctypes.c_int]),
    ("chat_version", ctypes.c_char_p, []),
]:
    _function = getattr(_lib, _name)
    _function.restype = _restype
    _function.argtypes = _argtypes


class Status(enum.IntEnum):
    """libchat's chat_status values, named as in libchat.h."""

    CHAT_OK = 0
    CHAT_INVALID_ARGUMENT = 1
    CHAT_INVALID_CONFIG = 2
    CHAT_RUNTIME_MISSING = 3
    CHAT_MODEL_LOAD_FAILED = 4
    CHAT_INVALID_REQUEST = 5
    CHAT_MODEL_NOT_FOUND = 6
    CHAT_CONTEXT_LENGTH_EXCEEDED = 7
    CHAT_OVERLOADED = 8
    CHAT_TIMEOUT = 9
    CHAT_CANCELLED = 10
    CHAT_UNAVAILABLE = 11
    CHAT_INTERNAL = 12
    CHAT_PANIC = 13


_STATUS_NAMES = {status.value: status.name for status in Status}


class ChatError(Exception):
    """A libchat call failed: `status` (int), `status_name` ("CHAT_INVALID_REQUEST", ...) and
    `message`, the calling thread's chat_last_error()."""

    def __init__(self, status: int, message: str):
        self.status = status
        # libchat appends new statuses: name one this binding does not know yet by its number.
        self.status_name = _STATUS_NAMES.get(status, f"CHAT_STATUS_{status}")
        self.message = message
        super().__init__(f"{_lib.chat_status_str(status).decode()}: {message}")


def _error(status: int) -> ChatError:
    """The error of the call that just returned `status`. Must run on that call's thread,
    before any other libchat call on it: the message is thread-local and replaced by each call."""
    buffer = ctypes.create_string_buffer(512)
    length = _lib.chat_last_error(buffer, len(buffer))
    if length >= len(buffer):
        buffer = ctypes.create_string_buffer(length + 1)
        _lib.chat_last_error(buffer, len(buffer))
    return ChatError(status, buffer.value.decode("utf-8", "replace"))


def _encode(value: Json) -> bytes:
    return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")


def version() -> str:
    """The loaded libchat's version, e.g. "0.1.0"."""
    return _lib.chat_version().decode()


class Engine:
    """One loaded model with its scheduler (chat_engine_new), shareable by threads.

    `config` is chat_engine_new's JSON object ("model" required; "threads", "max_running", ...),
    as a dict or a JSON string. Close it with close() or a `with` block; garbage collection
    closes it too.
    """

    def __init__(self, config: Json):
        self._handle: Optional[int] = None  # set before anything can fail, for __del__
        # Python-side count of calls in flight: chat_engine_free waits for calls already inside
        # libchat, but not for one between reading the handle and entering the library.
        self._idle = threading.Condition()
        self._calls = 0
        handle = ctypes.c_void_p()
        status = _lib.chat_engine_new(_encode(config), ctypes.byref(handle))
        if status != Status.CHAT_OK:
            raise _error(status)
        self._handle = handle.value

    def close(self) -> None:
        """Frees the engine once the calls in progress on other threads have finished (a
        Stream still generating included). Idempotent; later calls raise ValueError."""
        with self._idle:
            handle, self._handle = self._handle, None
            self._idle.wait_for(lambda: self._calls == 0)
        if handle:
            _lib.chat_engine_free(handle)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        self.close()

    def chat(self, request: Json) -> Dict[str, Any]:
        """Answers a /v1/chat/completions request; returns the chat.completion object."""
        return self._call(_lib.chat_engine_chat, request)

    def complete(self, request: Json) -> Dict[str, Any]:
        """Answers a legacy /v1/completions request (a raw "prompt"); returns the
        text_completion object."""
        return self._call(_lib.chat_engine_complete, request)

    def stream(self, request: Json) -> "Stream":
        """Starts a chat request whose answer is iterated piece by piece; see Stream."""
        return Stream(self, request)

    def _call(self, function, request: Json, *extra) -> Dict[str, Any]:
        """Runs function(engine, request, *extra, &response) and returns the parsed response,
        releasing libchat's string."""
        with self._idle:
            if not self._handle:
                raise ValueError("the engine is closed")
            handle = self._handle
            self._calls += 1
        try:
            response = ctypes.c_void_p()
            status = function(handle, _encode(request), *extra, ctypes.byref(response))
            if status != Status.CHAT_OK:
                raise _error(status)
        finally:
            with self._idle:
                self._calls -= 1
                self._idle.notify_all()
        try:
            return json.loads(ctypes.string_at(response.value))
        finally:
            _lib.chat_string_free(response.value)


class _End:
    """The last item a stream's queue gets: the response dict, or the exception that ended it."""

    def __init__(self, result: Union[Dict[str, Any], BaseException]):
        self.result = result


def _run_stream(engine: Engine, request: Json, pieces: queue.Queue, cancel: threading.Event) -> None:
    """The body of a Stream's thread: chat_engine_chat_stream, each piece put on `pieces`,
    then an _End. It holds no reference to the Stream, so that an abandoned Stream can be
    garbage-collected, which cancels the request."""
    callback_error = []

    def on_delta(_userdata, text, length):
        if cancel.is_set():
            return False
        try:
            pieces.put(ctypes.string_at(text, length).decode("utf-8"))
            return True
        except BaseException as e:  # ctypes would only print it; cancel and report it instead
            callback_error.append(e)
            return False

    callback = _DELTA_FN(on_delta)  # this local keeps the C function pointer alive for the call
    try:
        result = engine._call(_lib.chat_engine_chat_stream, request, callback, None)
    except Exception as e:  # the consumer's thread re-raises it
        result = callback_error[0] if callback_error else e
    pieces.put(_End(result))


class Stream:
    """The text pieces (str) of a streamed chat answer, generated by a background thread as
    they are iterated. When iteration ends, `response` is the final chat.completion object
    (with usage and finish_reason) and an error of the request is raised by the iteration.

    Stopping early, by close(), leaving a `with` block or dropping the Stream, cancels the
    request at its next piece; close() also waits for it to end.
    """

    def __init__(self, engine: Engine, request: Json):
        self.response: Optional[Dict[str, Any]] = None
        self._pieces: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=_run_stream, args=(engine, request, self._pieces, self._cancel), name="libchat-stream", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if not self._finished:
            item = self._pieces.get()
            if isinstance(item, str):
                return item
            self._finish(item)
        raise StopIteration

    def _finish(self, end: _End) -> None:
        self._finished = True
        if not isinstance(end.result, BaseException):
            self.response = end.result
        elif not (
            self._cancel.is_set() and isinstance(end.result, ChatError) and end.result.status == Status.CHAT_CANCELLED
        ):
            raise end.result

    def close(self) -> None:
        """Cancels the request if it is still running and waits for it to end. Its
        cancellation is not an error; another error not yet raised by the iteration is."""
        self._cancel.set()
        self._thread.join()
        while not self._finished:
            item = self._pieces.get_nowait()
            if isinstance(item, _End):
                self._finish(item)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        # No join here: __del__ may run on any thread, the stream's own included.
        self._cancel.set()
