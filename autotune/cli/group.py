"""The ``autotune`` click group and its entry point, which turns every failure into one line.

Bad input ends with one line on stderr and exit code 2, never a traceback; set
AUTOTUNE_DEBUG=1 to see the traceback of an unexpected internal error. The commands live in
the modules beside this one and register themselves on ``cli``; this module imports none of
them (``autotune.cli`` does).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings

import click

EXIT_USAGE = 2
# what click (8.2 and later) raises for a group called with nothing: its message is the help
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class UserError(click.ClickException):
    """Bad input: reported as one line, exit code 2."""

    exit_code = EXIT_USAGE


def error_line(message: str) -> None:
    click.echo(f"autotune: error: {message}", err=True)


def load_plugins() -> None:
    """Import the modules named in AUTOTUNE_PLUGINS (comma-separated): templates of your own
    operators register themselves on import, like the built-in ones. Worker processes import
    a template's module by name, so it must be importable there too (PYTHONPATH)."""
    for name in filter(None, (n.strip() for n in os.environ.get("AUTOTUNE_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise UserError(f"AUTOTUNE_PLUGINS: cannot import {name}: {type(exc).__name__}: {exc}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it ends as an interrupt does: the log
    keeps every record, an MLflow run is marked KILLED, half-written folders are removed."""


# set by the handler: code that waits in native calls (Ray's) may turn the Terminated it
# raises into a plain KeyboardInterrupt, which must still end the job as terminated
_sigterm_received = threading.Event()


def _raise_terminated(signum, frame) -> None:
    _sigterm_received.set()
    raise Terminated()


def _is_termination(exc: BaseException | None) -> bool:
    return isinstance(exc, Terminated) or (isinstance(exc, KeyboardInterrupt) and _sigterm_received.is_set())


# the commands whose interruption leaves measurements behind: all of them are in the log
LOGGING_COMMANDS = ("tune", "tune-model", "sweep")


def _stopped(what: str, argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), "")
    return f"{what}; every measured record is in the log" if command in LOGGING_COMMANDS else what


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the click group, turning every failure into one line."""
    if threading.current_thread() is threading.main_thread():
        _sigterm_received.clear()
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        load_plugins()
        cli.main(args=argv, prog_name="autotune", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:  # click turns an interrupt into Abort
        if _is_termination(exc.__cause__):
            error_line(_stopped("terminated", argv))
            sys.exit(143)
        error_line(_stopped("interrupted", argv) if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted")
        sys.exit(130)
    except NO_ARGS_IS_HELP as exc:  # bare `autotune`: the help, as it reads with --help
        click.echo(exc.format_message())
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        error_line(exc.format_message().replace("\n", " "))
        sys.exit(EXIT_USAGE if isinstance(exc, (click.UsageError, UserError)) else exc.exit_code)
    except KeyboardInterrupt as exc:
        if _is_termination(exc):
            error_line(_stopped("terminated", argv))
            sys.exit(143)
        error_line(_stopped("interrupted", argv))
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # an internal error: still one line unless asked for more
        if os.environ.get("AUTOTUNE_DEBUG"):
            raise
        error_line(f"internal error: {type(exc).__name__}: {exc} (set AUTOTUNE_DEBUG=1 for a traceback)")
        sys.exit(1)
    sys.exit(0)


# ----------------------------------------------------------------------------- --cluster
# The commands that measure take --cluster and --runner-cpus; they are attached here, where
# every command is registered, and put in the click context, where ``make_job`` reads them.

CLUSTER_COMMANDS = ("tune", "tune-model", "sweep")
CLUSTER_KEY = "autotune.cluster"


def _keep_cluster_option(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return value
    if param.name == "cluster":
        from measure.cluster import parse_cluster_address  # reads the address; Ray is not imported

        try:
            parse_cluster_address(value)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    elif value < 1:
        raise UserError(f"--runner-cpus must be >= 1, got {value}")
    ctx.meta.setdefault(CLUSTER_KEY, {})[param.name] = value
    return value


def cluster_options() -> list[click.Option]:
    return [
        click.Option(["--cluster"], default=None, metavar="ray[://HOST:PORT]", expose_value=False,
                     callback=_keep_cluster_option,
                     help="measure on a Ray cluster: builds on every CPU of it, a runner per GPU or CPU host; "
                          "ray: this machine's cluster (or a new local one), ray://HOST:PORT: the cluster whose "
                          "head is there (run this on one of its nodes)"),
        click.Option(["--runner-cpus"], default=None, type=int, expose_value=False, callback=_keep_cluster_option,
                     help="with --cluster, cpu: the cores each CPU host's runner times on (the rest compile) "
                          "[default: 1]"),
    ]


class AutotuneCommand(click.Command):
    """A command whose single-value options may be given once: click keeps the last of
    ``--log a --log b`` silently, and the command would read one log where two were meant."""

    def make_parser(self, ctx: click.Context):
        parser = super().make_parser(ctx)
        for option in {**parser._long_opt, **parser._short_opt}.values():
            if option.action == "store":
                option.process = self._once(option, option.process)
        return parser

    @staticmethod
    def _once(option, process):
        def once(value, state) -> None:
            if option.dest in state.opts:
                raise UserError(f"{'/'.join(option._long_opts or option._short_opts)} given twice: it takes one value")
            process(value, state)
        return once


class AutotuneGroup(click.Group):
    """The ``autotune`` group: the commands that measure get the cluster options, and no
    single-value option may be given twice (``AutotuneCommand``)."""

    command_class = AutotuneCommand

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if (name or cmd.name) in CLUSTER_COMMANDS:
            cmd.params.extend(cluster_options())
        super().add_command(cmd, name)


@click.group(cls=AutotuneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-autotune", prog_name="autotune")
def cli() -> None:
    """Autotune LLM operator kernels with learned cost models."""
    warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning that reaches the user (a skipped log line, a stale record) as the CLI's other
    warnings read: one line, not the module and line of code that raised it."""
    click.echo(f"autotune: warning: {message}", err=True)


