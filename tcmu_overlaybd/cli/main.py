"""Entry point of the ``obd`` command: the click group and the error boundary.

Command groups live in their own modules (``userspace``, ``cache_cmd``,
``kernel``, ``convert_cmd``); each exposes ``register(group)``.  Every
``ObdError`` becomes one line on stderr and the error's exit code; a traceback
means a bug in obd.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from .. import __version__
from ..errors import ObdError
from ..logs import setup_logging


#: command name -> the ``cli`` module whose ``register(group)`` adds it; a module is
#: imported only when one of its commands runs (or help lists them): ``obd mount`` must
#: not pay for the converter's or the stats server's imports (issue 6)
_COMMAND_MODULES = {
    "inspect": "userspace", "export": "userspace", "ls": "userspace", "cat": "userspace",
    "cache": "cache_cmd",
    "mount": "kernel", "umount": "kernel", "list": "kernel", "recover": "kernel", "doctor": "kernel",
    "convert": "convert_cmd",
    "stats": "stats_cmd",
    "record-trace": "trace_cmd", "trace": "trace_cmd",
}


class _LazyGroup(click.Group):
    """A click group whose commands are registered by their module on first use."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(self.commands) | set(_COMMAND_MODULES))

    def get_command(self, ctx, name: str):
        if name not in self.commands and name in _COMMAND_MODULES:
            importlib.import_module(f"{__package__}.{_COMMAND_MODULES[name]}").register(self)
        return self.commands.get(name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="obd")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """obd: run containers from overlaybd and FastOCI images without downloading them first."""
    level = logging.WARNING - 10 * min(verbose, 2)
    setup_logging(level)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="obd", standalone_mode=False)
    except ObdError as e:
        click.echo(f"obd: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("obd: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("obd: interrupted", err=True)
        return 130
    except click.exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except BrokenPipeError:
        # `obd cat ... | head`: the reader went away; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run() -> None:
    """Console-script entry: exit with main()'s status."""
    sys.exit(main())
