"""Keep API keys out of what the CLI prints and out of the pipeline's stage logs.

A key can reach the output by paths the code does not control: pasted where a variable NAME goes
(``--...judge.api_key_env sk-...``) it is quoted by the argument parser's error, a server may echo it
in an error body, a traceback may show it. So the output streams themselves are filtered: every
text written through ``sys.stdout``/``sys.stderr`` (and every line a stage's child process writes
to its log) has these replaced by ``[REDACTED]``:

* strings shaped like API keys: ``sk-...`` (OpenAI, including ``sk-proj-``), ``hf_...``
  (Hugging Face) and the token after ``Bearer``;
* the values of environment variables whose names say they hold a credential (``*KEY*``,
  ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``...), and of the variables the arguments name with
  ``api_key_env``;
* an ``api_key_env`` argument that looks like the key itself, pasted by mistake (not a variable
  name, or an unset one in mixed case with digits).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

MASK = "[REDACTED]"

_KEY_SHAPED = re.compile(
    r"\bsk-[A-Za-z0-9_-]{16,}"  # OpenAI and compatible servers (sk-..., sk-proj-..., sk-ant-...)
    r"|\bhf_[A-Za-z0-9]{20,}"  # Hugging Face tokens
    r"|(?<=Bearer )[A-Za-z0-9._~+/-]{12,}=*",  # an Authorization header's token
)
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: values shorter than this are not treated as secrets (they would mask ordinary words and numbers)
MIN_SECRET_LENGTH = 8


def secrets_from(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> set[str]:
    """The literal values to mask for a run with arguments ``argv`` in environment ``environ``.

    >>> sorted(secrets_from(["--judge.api_key_env", "JUDGE"], {"JUDGE": "s3cr3t-value", "HOME": "/root"}))
    ['s3cr3t-value']
    >>> sorted(secrets_from(["--judge.api_key_env=pasted-key-value"], {}))
    ['pasted-key-value']
    """
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if _SECRET_NAME.search(name)}
    for value in _api_key_env_arguments(argv):
        found |= _named_by(value, environ)
    return {value for value in found if len(value) >= MIN_SECRET_LENGTH}


def secrets_in_config(config: Any, environ: Mapping[str, str] | None = None) -> set[str]:
    """The values to mask for a parsed config (nested mappings and lists): those of the variables
    its ``api_key_env`` settings name, and any such setting that looks like the key itself.

    >>> sorted(secrets_in_config({"trainer": {"callbacks": [{"judge": {"api_key_env": "J"}}]}}, {"J": "value-of-j"}))
    ['value-of-j']
    """
    environ = os.environ if environ is None else environ
    found: set[str] = set()
    if isinstance(config, Mapping):
        for key, value in config.items():
            if str(key).endswith("api_key_env") and isinstance(value, str):
                found |= _named_by(value, environ)
            else:
                found |= secrets_in_config(value, environ)
    elif isinstance(config, list):
        for value in config:
            found |= secrets_in_config(value, environ)
    return {value for value in found if len(value) >= MIN_SECRET_LENGTH}


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` too in the streams :func:`redact_process_output` filters (the CLI adds those
    of the parsed config: a YAML may name the variable)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, RedactingStream):
            stream.secrets |= {value for value in secrets if len(value) >= MIN_SECRET_LENGTH}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with key-shaped strings and the given ``secrets`` replaced by :data:`MASK`.

    >>> redact("HTTP 401: Incorrect API key provided: sk-proj-abcdefghijklmnop1234.")
    'HTTP 401: Incorrect API key provided: [REDACTED].'
    >>> redact("Authorization: Bearer abc.def-123456789", secrets=["hunter2hunter2"])
    'Authorization: Bearer [REDACTED]'
    """
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(secret, MASK)
    return _KEY_SHAPED.sub(MASK, text)


class RedactingStream(io.TextIOBase):
    """A text stream that writes to ``target`` what :func:`redact` leaves. Text is passed on a
    whole line at a time (or on ``flush``), so a key written in pieces is still seen whole."""

    def __init__(self, target: TextIO, secrets: Iterable[str]) -> None:
        self.target = target
        self.secrets = set(secrets)
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        complete, newline, self._pending = self._pending.rpartition("\n")
        if newline:
            self.target.write(redact(complete + newline, self.secrets))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.target.write(redact(self._pending, self.secrets))
            self._pending = ""
        self.target.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


def redact_process_output(argv: Sequence[str]) -> None:
    """Filter this process's ``sys.stdout`` and ``sys.stderr`` for the rest of its life (the CLI
    calls this first, before anything that could print). Calling it again changes nothing."""
    secrets = secrets_from(argv)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream, secrets))


def run_to_log(command: Sequence[str], log_file: Path) -> int:
    """Run ``command`` with its stdout and stderr going, redacted line by line, to ``log_file``;
    returns its exit code. The child's arguments and environment decide what is secret."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    secrets = secrets_from(command)
    with open(log_file, "w", encoding="utf-8") as out:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
            assert process.stdout is not None
            try:
                for raw in process.stdout:
                    out.write(redact(raw.decode("utf-8", errors="replace"), secrets))
                    out.flush()
            except BaseException:  # e.g. Ctrl-C in the parent: do not leave the child running
                process.kill()
                raise
        return process.returncode


def _named_by(api_key_env: str, environ: Mapping[str, str]) -> set[str]:
    """What an ``api_key_env`` setting makes secret: its variable's value, and itself when it
    looks like a key rather than a name."""
    found = {environ.get(api_key_env, "")}
    if _looks_like_a_key(api_key_env, environ):
        found.add(api_key_env)
    return found


def _looks_like_a_key(value: str, environ: Mapping[str, str]) -> bool:
    """Not a variable name, or an unset one in mixed case with digits (names are rarely like that).

    >>> [_looks_like_a_key(v, {}) for v in ("OPENAI_API_KEY", "my_key", "sk-abc", "aZ09xQ7vLm3kP2rT8wYb")]
    [False, False, True, True]
    """
    if not _VARIABLE_NAME.match(value):
        return True
    return value not in environ and any(c.isdigit() for c in value) and value.lower() != value != value.upper()


def _api_key_env_arguments(argv: Sequence[str]) -> list[str]:
    """Values given to any ``...api_key_env`` option, as ``--x.api_key_env V`` or ``--x.api_key_env=V``."""
    values = []
    for index, argument in enumerate(argv):
        option, equals, value = argument.partition("=")
        if not option.startswith("--") or not option.endswith("api_key_env"):
            continue
        if equals:
            values.append(value)
        elif index + 1 < len(argv):
            values.append(argv[index + 1])
    return values
