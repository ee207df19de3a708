"""``python -m pathvlm_lightning``: ``infer`` and ``export`` (see :mod:`pathvlm_lightning.commands`),
everything else (``fit``, ``validate``, ``test``, ``predict``, ``--help``) to LightningCLI."""

from __future__ import annotations

import sys

from pathvlm_lightning.commands import COMMANDS, dispatch
from pathvlm_lightning.logs import configure_logging, pop_log_level
from pathvlm_lightning.redact import redact_process_output


def run(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` defaults to the process's arguments."""
    given = sys.argv[1:] if argv is None else argv
    redact_process_output(given)  # API keys never reach the terminal, whoever prints them
    level, rest = pop_log_level(given)
    configure_logging(level)  # the project's INFO lines to stderr, third-party loggers at WARNING
    code = dispatch(rest)
    if code is not None:
        sys.exit(code)
    if given[:1] in (["-h"], ["--help"]):  # LightningCLI's help lists only its own subcommands
        print(f"Also: {', '.join(COMMANDS)} (python -m pathvlm_lightning infer --help)")
        print("Any command: --log_level DEBUG|INFO|WARNING|ERROR (the project's log lines on stderr; INFO)\n")
    from omegaconf.errors import OmegaConfBaseException

    from pathvlm_lightning.cli import ConfigBaseError, main
    from pathvlm_lightning.grpo.losses.legacy import LegacyLossConfigError
    from pathvlm_lightning.legacy_parts import LegacyPartsConfigError

    try:
        main(argv)
    except (ConfigBaseError, OmegaConfBaseException) as error:  # a base or a ${...} that cannot be resolved
        sys.exit(f"error: {error}")
    except (LegacyLossConfigError, LegacyPartsConfigError) as error:  # a config in an older layout: the new one
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    run()
