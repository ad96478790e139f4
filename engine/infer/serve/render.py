"""Chat templates rendered in a forked child process that is killed when a render runs too long.

A chat template is Jinja code shipped with the model. The sandbox keeps it from touching the server,
but not from looping: `{% for i in range(100000) %}{% for j in range(100000) %}` runs for hours, and
a render cannot be interrupted from another thread. So the render runs in a child process: the
server waits at most `timeout_s` for the text, then SIGKILLs the child (the next render forks a
fresh one). The child also caps its own memory (RLIMIT_AS, Linux) and the length of the text it
sends back, so neither `"x" * 10**10` nor a template that repeats its input can exhaust the host.

The child is forked rather than spawned: it starts in milliseconds with the tokenizer already in
memory (a spawned interpreter would re-import torch). It runs only Jinja and pickle, closes every
inherited file descriptor (client sockets, the listening socket) and never touches torch.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from multiprocessing.connection import Connection
from typing import Optional

import jinja2

from engine.data.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("engine.infer.serve")


class TemplateRejected(ValueError):
    """The chat template rejected the messages (raise_exception, a missing template): the client's 400."""


class TemplateFailed(RuntimeError):
    """The chat template ran past its time, memory or output bound, or crashed: a server-side 500."""


class ChatRenderer:
    """Renders `tokenizer`'s chat template in a child process, bounded in time, memory and output length.

    `render` blocks (call it from a worker thread); renders are serialized through one child.
    """

    def __init__(self, tokenizer: Tokenizer, timeout_s: float = 2.0, max_chars: int = 1 << 21,
                 max_memory_bytes: int = 1 << 30):
        self.tokenizer, self.timeout_s, self.max_chars = tokenizer, timeout_s, max_chars
        self.max_memory_bytes = max_memory_bytes
        self._lock = threading.Lock()
        self._pid: Optional[int] = None
        self._conn: Optional[Connection] = None
        self.restarts = 0  # children killed for running past timeout_s (tests and logs)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template text for `messages`; TemplateRejected (bad messages) or TemplateFailed (a bound, a bug)."""
        with self._lock:
            try:
                conn = self._child()
                conn.send((messages, add_generation_prompt))
            except OSError:  # the child died since the last render (e.g. the OOM killer): fork a fresh one
                self._kill()
                conn = self._child()
                conn.send((messages, add_generation_prompt))
            if not conn.poll(self.timeout_s):
                self._kill()
                self.restarts += 1
                log.warning("chat template: render stopped after %.1f s (child killed)", self.timeout_s)
                raise TemplateFailed(f"the model's chat template did not finish rendering within {self.timeout_s:g} s "
                                    "(stopped; the template loops too long)")
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):  # the child died mid-render (e.g. killed by the OOM killer)
                self._kill()
                raise TemplateFailed("the chat template's render process died") from None
        if kind == "ok":
            return value
        raise (TemplateRejected if kind == "template_error" else TemplateFailed)(value)

    @property
    def pid(self) -> Optional[int]:
        """The render process's id; None before the first render and after a kill."""
        return self._pid

    def close(self) -> None:
        """Stop the child process, if any."""
        with self._lock:
            self._kill()

    # ---------------------------------------------------------------- the child
    def _child(self) -> Connection:
        if self._conn is None:
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the child: never returns
                try:
                    keep = child_end.fileno()
                    _close_inherited_fds(keep)
                    _serve_renders(Connection(keep), self.tokenizer, self.max_chars, self.max_memory_bytes)
                finally:
                    os._exit(0)
            child_end.close()
            self._pid, self._conn = pid, Connection(parent_end.detach())
        return self._conn

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._pid is not None:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            self._pid = None


def _close_inherited_fds(keep: int) -> None:
    """Close every fd but stdio and `keep`: a client socket the child held open would outlive the server's close."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]  # Linux: only the open ones
    except OSError:
        fds = [*range(3, keep), *range(keep + 1, min(os.sysconf("SC_OPEN_MAX"), 1 << 16))]
    for fd in fds:
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):  # e.g. the fd listdir itself used, already closed
                os.close(fd)


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what the child inherited + `extra_bytes` (Linux; elsewhere only the timeout)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            inherited = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (inherited + extra_bytes, resource.RLIM_INFINITY))
    except (ImportError, OSError, ValueError):
        pass


def _serve_renders(conn: Connection, tokenizer: Tokenizer, max_chars: int, max_memory: int) -> None:
    """The child's loop: (messages, add_generation_prompt) in, ("ok" | "template_error" | "limit", text) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; the child ends when its pipe closes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _limit_memory(max_memory)
    while True:
        try:
            messages, add_generation_prompt = conn.recv()
        except (EOFError, OSError):
            return
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            if len(text) > max_chars:
                reply = ("limit", f"the model's chat template rendered {len(text)} characters; this server's limit "
                                  f"is {max_chars}")
            else:
                reply = ("ok", text)
        except (TokenizerError, jinja2.TemplateError) as e:
            reply = ("template_error", str(e))
        except MemoryError:
            reply = ("limit", f"the model's chat template needed more than {max_memory >> 20} MiB of memory")
        except RecursionError:
            reply = ("limit", "the model's chat template recursed too deeply")
        except Exception as e:  # a template bug (e.g. a TypeError inside it), not the client's
            reply = ("limit", f"the model's chat template failed: {type(e).__name__}: {e}")
        conn.send(reply)
