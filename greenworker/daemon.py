"""What the worker command does to its process, as Celery's does: the pid file
(``--pidfile``), detaching (``-D``), the user and group to run as (``--uid``,
``--gid``) and the umask (``--umask``).

Plain ``os`` calls, no hub and no app: the command calls them around the worker.
"""

from __future__ import annotations

import atexit
import grp
import logging
import os
import pwd
import sys

log = logging.getLogger("greenworker.daemon")

#: Set by ``-D`` for the program it starts detached: the pid that must not detach again
#: (the detached worker, and the same pid after a restart in place).  A pid, not a flag,
#: so a greenworker that a task starts does not take itself for detached.
DETACHED_ENV = "GREENWORKER_DETACHED_PID"


class DaemonError(Exception):
    """A process option cannot be applied (an unknown user, a pid file that cannot be
    written...): one readable line."""


class PidfileInUse(DaemonError):
    """The pid file names a process that is running."""


class Pidfile:
    """A pid file: refuses a live process's, replaces a stale one with a warning,
    and is removed when this process exits (not when it restarts in place)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def check(self) -> None:
        """Raise :class:`PidfileInUse` if the file names another process that is alive;
        remove it, with a warning, if that process is gone or the file is broken."""
        try:
            with open(self.path) as file:
                text = file.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise DaemonError(f"--pidfile {self.path}: cannot read it: {exc.strerror}") from None
        try:
            pid = int(text.strip())
        except ValueError:
            log.warning("broken pidfile %s found: removing it", self.path)
        else:
            if pid == os.getpid():
                pass  # this process, restarted in place: the file stays true
            elif pid > 0 and _alive(pid):
                raise PidfileInUse(
                    f"pidfile {self.path} already exists: seems we're already running (pid {pid})"
                )
            else:
                log.warning("stale pidfile %s (pid %d is not running): removing it", self.path, pid)
        self._remove()

    def check_writable(self) -> None:
        """:meth:`check`, then make sure the file can be created (and leave none): what
        ``-D`` does before it forks, so that a pid file the daemon could not write is
        one line on the terminal rather than a silent exit."""
        self.check()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # this process's own (a restart in place) or a new one
            return
        except OSError as exc:
            raise DaemonError(f"--pidfile {self.path}: cannot write it: {exc.strerror}") from None
        os.close(fd)
        self._remove()

    def acquire(self) -> None:
        """Check, then write this process's pid; it is removed at exit."""
        self.check()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another worker wrote it between check and open
            raise PidfileInUse(
                f"pidfile {self.path} already exists: seems we're already running"
            ) from None
        except OSError as exc:
            raise DaemonError(f"--pidfile {self.path}: cannot write it: {exc.strerror}") from None
        with os.fdopen(fd, "w") as file:
            file.write(f"{os.getpid()}\n")
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the file if it still names this process."""
        try:
            with open(self.path) as file:
                mine = file.read().strip() == str(os.getpid())
        except OSError:
            return
        if mine:
            self._remove()

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DaemonError(f"--pidfile {self.path}: cannot remove it: {exc.strerror}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's process
    return True


def check_logfile(path: str) -> None:
    """Make sure ``path`` can be appended to (before the terminal is let go)."""
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise DaemonError(f"-f/--logfile {path}: cannot open it: {exc.strerror}") from None


def already_detached() -> bool:
    """True in the program ``-D`` started (and after it restarted in place)."""
    return os.environ.get(DETACHED_ENV) == str(os.getpid())


def detach() -> dict[str, str]:
    """Become a daemon: fork (the parent exits 0), start a new session, fork again,
    point stdin, stdout and stderr at ``/dev/null``.

    Returns the environment to start the detached program with (see
    :data:`DETACHED_ENV`); the caller replaces this process with it, and the program
    goes to its ``--workdir`` (else stays where it was started), as Celery's does."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if os.fork() > 0:
        os._exit(0)  # the command returns to its caller's shell
    os.setsid()  # no controlling terminal: a hangup of the shell does not reach us
    if os.fork() > 0:
        os._exit(0)  # the session leader goes: the daemon can never get a terminal back
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    return {**os.environ, DETACHED_ENV: str(os.getpid())}


def parse_umask(value: str) -> int:
    """Celery's reading of ``--umask``: octal with a leading 0 (``022``), else decimal."""
    try:
        mask = int(value, 8 if value.startswith("0") else 10)
    except ValueError:
        raise DaemonError(
            f"expected 022 (octal: a leading 0) or 18 (decimal), got {value!r}"
        ) from None
    if not 0 <= mask <= 0o777:
        raise DaemonError(f"expected a mask from 0 to 0777, got {value!r}")
    return mask


def drop_privileges(uid: str | None, gid: str | None) -> None:
    """Run as user ``uid`` and group ``gid`` (names or numbers), as Celery does: with a
    user and no group, the user's own group; the user's other groups too.  Nothing
    changes when this process already runs as them (a restart in place)."""
    user = _user(uid) if uid is not None else None
    group = _group(gid) if gid is not None else (user.pw_gid if user is not None else None)
    if (user is None or os.getuid() == user.pw_uid) and (group is None or os.getgid() == group):
        return
    try:
        if group is not None:
            if user is not None:
                os.initgroups(user.pw_name, group)
            os.setgid(group)
        if user is not None:
            os.setuid(user.pw_uid)
    except OSError as exc:
        who = " ".join(
            part for part in (f"user {uid}" if uid else "", f"group {gid}" if gid else "") if part
        )
        raise DaemonError(f"cannot run as {who}: {exc.strerror}") from None


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise DaemonError(f"--uid: no such user {name!r}") from None


def _group(name: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise DaemonError(f"--gid: no such group {name!r}") from None
