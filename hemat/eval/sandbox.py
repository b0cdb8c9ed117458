"""Run untrusted, model-written Python (code rewards in GRPO, HumanEval) in a contained child process.

Layers, outermost first; each one catches what the one inside it can miss:
- a fresh `python -I -S` (isolated mode: no site, no user site, PYTHON* variables ignored, script dir
  not on sys.path) in its own session, so the whole process group can be killed at once;
- an empty environment except PATH/LANG/HOME/TMPDIR, and a fresh temporary working directory that is
  deleted afterwards, also on failure;
- as root: its own network namespace (only a down loopback) and a dedicated unprivileged uid, so file
  permissions stop writes into the project and reads of root-only files, RLIMIT_NPROC contains a fork
  bomb (root ignores it), it cannot signal root's processes, and every process it leaves behind can be
  found and killed by uid without touching anything else on the machine;
- resource limits: CPU seconds, address space, processes, file size, open files, no core dumps;
- an audit hook (PEP 578) installed before the untrusted code, which Python code cannot remove: it
  refuses sockets, new processes, signals to other processes, ctypes, reads outside the working
  directory and the standard library, and writes outside the working directory. On its own it is not a
  security boundary (native code bypasses it); without root it is the only network/file/signal guard,
  and `SandboxResult.isolation` says which layers a run actually had.
The parent enforces the wall clock and caps what it reads from stdout/stderr, killing on overflow.
Linux only (namespaces, /proc)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache

from hemat.errors import HematError

log = logging.getLogger(__name__)

# Dedicated sandbox uids, one per concurrent run: not in the passwd database and running nothing when
# claimed, so after a run every process with that uid is the sandbox's own and may be killed.
SANDBOX_UID_BASE = 61000
SANDBOX_UID_COUNT = 1000
DEFAULT_OUTPUT_BYTES = 65536  # per stream
DEFAULT_PROCESSES = 16  # tasks, threads included
FILE_SIZE_LIMIT = 16 * 2**20  # bytes per file the program writes
OPEN_FILES_LIMIT = 64
DRAIN_S = 1.0  # after a kill, how long to wait for the pipes to close before giving up on them
TRUNCATED = "\n[hemat sandbox: output truncated at {} bytes]\n"

# Runs in the child before the untrusted code; argv[1] is the JSON config. It is the only trusted code in
# that process, so it keeps no state the program could use: the guard binds what it calls as defaults.
_BOOTSTRAP = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
layers = []

# A new network namespace needs CAP_SYS_ADMIN, so it comes before dropping root. os.unshare is 3.12+.
if os.geteuid() == 0:
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) == 0:  # CLONE_NEWNET
            layers.append("netns")
    except Exception:
        pass
    for name in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]  # re-importing it then raises an audit event the guard refuses

def limit(which, soft, hard):
    old_hard = resource.getrlimit(which)[1]
    if old_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, old_hard), min(hard, old_hard)
    resource.setrlimit(which, (soft, hard))

limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
limit(resource.RLIMIT_AS, cfg["memory"], cfg["memory"])
limit(resource.RLIMIT_NPROC, cfg["nproc"], cfg["nproc"])  # counts threads too; root ignores it
limit(resource.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"])
limit(resource.RLIMIT_NOFILE, cfg["nofile"], cfg["nofile"])
limit(resource.RLIMIT_CORE, 0, 0)
layers.append("rlimits")

if cfg["uid"] is not None:  # setuid as root sets real, effective and saved uid: no way back
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    layers.append("uid")

def install_guard(workdir, read_roots, devices, pid, fspath=os.fspath, getcwd=os.getcwd,
                  any=any, isinstance=isinstance, type=type, str=str, bytes=bytes, int=int,
                  PermissionError=PermissionError,
                  write_flags=os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC):
    deny = frozenset(("os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
        "subprocess.Popen", "os.killpg", "os.symlink", "os.link", "ctypes.dlopen", "ctypes.dlsym",
        "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer", "sys.settrace", "sys.setprofile",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sqlite3.enable_load_extension",
        "sqlite3.load_extension"))
    path_writes = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.chmod": 1,
        "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.setxattr": 1, "os.removexattr": 1,
        "os.chdir": 1, "sqlite3.connect": 1}  # event -> how many leading arguments are paths
    # posix and _signal are loaded at startup, so only a re-import (that could bring back what is
    # deleted from them below) raises this event
    banned_modules = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing",
        "_multiprocessing", "posix", "_signal"))

    def resolve(path):  # lexical, no symlinks: the program cannot make any, and this uses only builtins
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path, roots):
        return any(path == root or path.startswith(root + "/") for root in roots)

    def guard(event, args):
        if event in deny or event.startswith("socket."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if type(path) is int:
                return  # an fd this guard already let through
            where = resolve(path)
            if inside(where, (workdir,)) or where in devices:
                return
            # raw os.open (mode None) stays in the workdir, so no dir fd can point elsewhere
            reading = mode is not None and isinstance(flags, int) and not flags & write_flags
            if reading and inside(where, read_roots):
                return
            raise PermissionError(f"sandbox: open {where!r} is outside the sandbox")
        if event in ("os.listdir", "os.scandir"):
            if args[0] is None or type(args[0]) is int:
                return
            where = resolve(args[0])
            if not inside(where, (workdir,) + read_roots):
                raise PermissionError(f"sandbox: listing {where!r} is outside the sandbox")
        elif event in path_writes:
            for path in args[:path_writes[event]]:
                if type(path) is not int and not inside(resolve(path), (workdir,)):
                    raise PermissionError(f"sandbox: {event} {resolve(path)!r} is outside the sandbox")
        elif event == "os.kill":
            if args[0] != pid:
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event == "resource.prlimit":
            if args[0] not in (0, pid):
                raise PermissionError("sandbox: prlimit on other processes is not allowed")
        elif event == "import":
            name, filename = args[0], args[1]
            if name.split(".")[0] in banned_modules:
                raise PermissionError(f"sandbox: importing {name} is not allowed")
            if isinstance(filename, str) and not inside(resolve(filename), read_roots):
                raise PermissionError(f"sandbox: loading {filename!r} is not allowed")

    sys.addaudithook(guard)

workdir = os.getcwd()
read_roots = tuple(p for p in sys.path if p.startswith("/"))  # -I -S: just the standard library
install_guard(workdir, read_roots, frozenset(("/dev/null", "/dev/urandom", "/dev/random")), os.getpid())
layers.append("audit")
del install_guard, limit

def run(source, path, forbid_exit, exit_now=os._exit, stdout=sys.stdout, stderr=sys.stderr):
    # The exit status is a local only this function sets: a hostile excepthook or print that raises
    # SystemExit(0) still ends in exit_now(1). os._exit also skips the program's atexit handlers.
    main = type(sys)("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main  # the program gets a fresh __main__, not this bootstrap's globals
    sys.argv = [path]
    status = 1
    try:
        try:
            exec(compile(source, path, "exec"), main.__dict__)
            status = 0
        except SystemExit as e:
            if forbid_exit:
                print("hemat sandbox: the program exited before its tests finished", file=sys.stderr)
            elif e.code is None or isinstance(e.code, int):
                status = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException as e:
            e = e.with_traceback(e.__traceback__.tb_next)  # leave this bootstrap out of the traceback
            sys.excepthook(type(e), e, e.__traceback__)
    finally:
        for stream in (sys.stdout, sys.stderr, stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        exit_now(status)

import posix, _signal  # signalling by pidfd raises no audit event; os._exit would skip a check's tests
doomed = [(os, "pidfd_open"), (posix, "pidfd_open"), (_signal, "pidfd_send_signal")]
for owner, name in doomed + [(os, "_exit"), (posix, "_exit")] * cfg["forbid_exit"]:
    if hasattr(owner, name):
        delattr(owner, name)

os.write(cfg["report_fd"], json.dumps(layers).encode())
os.close(cfg["report_fd"])
with open(workdir + "/main.py", encoding="utf-8") as f:
    run(f.read(), workdir + "/main.py", cfg["forbid_exit"])
'''


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 and was not killed
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "wall-clock", "cpu", "memory", "output" or None
    duration_s: float
    isolation: tuple[str, ...]  # layers this run had: "netns", "rlimits", "uid", "audit"


@dataclass(frozen=True)
class _Plan:
    interpreter: str
    drop_uid: bool  # run as a dedicated unprivileged uid (needs root)


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_output_bytes: int = DEFAULT_OUTPUT_BYTES,
    max_processes: int = DEFAULT_PROCESSES,
) -> SandboxResult:
    """Run `code` as the main module of a contained Python process and return what happened.
    stdout/stderr are each capped at max_output_bytes; cpu_s (whole seconds) defaults to timeout_s + 1."""
    return _run(code, stdin, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes, forbid_exit=False)


def check_program(
    program: str,
    tests: str,
    entry_point: str | None = None,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
) -> SandboxResult:
    """A solution followed by its tests; with entry_point, HumanEval style: the tests define
    `check(candidate)` and `check(entry_point)` is called. ok means every test ran and passed: a program
    that exits before its tests finish (sys.exit, os._exit) fails."""
    if entry_point is not None and not entry_point.isidentifier():
        raise HematError(f"entry_point {entry_point!r} is not a Python identifier")
    code = f"{program}\n\n{tests}\n"
    if entry_point is not None:
        code += f"\ncheck({entry_point})\n"
    return _run(code, "", timeout_s, None, memory_mb, DEFAULT_OUTPUT_BYTES, DEFAULT_PROCESSES, forbid_exit=True)


def _run(code, stdin, timeout_s, cpu_s, memory_mb, max_output_bytes, max_processes, forbid_exit) -> SandboxResult:
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise HematError(f"code and stdin must be str, got {type(code).__name__} and {type(stdin).__name__}")
    if not timeout_s > 0:
        raise HematError(f"timeout_s must be > 0, got {timeout_s!r}")
    if cpu_s is not None and not cpu_s > 0:
        raise HematError(f"cpu_s must be > 0, got {cpu_s!r}")
    if memory_mb < 64:
        raise HematError(f"memory_mb must be >= 64 (the interpreter needs it), got {memory_mb!r}")
    if max_output_bytes < 1:
        raise HematError(f"max_output_bytes must be >= 1, got {max_output_bytes!r}")
    if max_processes < 1:
        raise HematError(f"max_processes must be >= 1, got {max_processes!r}")
    plan = _plan()
    with _claim_uid() if plan.drop_uid else contextlib.nullcontext() as uid:
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="hemat-sandbox-"))
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            if uid is not None:
                for path in (workdir, os.path.join(workdir, "main.py")):
                    os.chown(path, uid, uid)
            config = {
                # by default one second over the wall clock: a backstop for threads burning CPU in parallel
                "cpu_s": math.ceil(cpu_s) if cpu_s is not None else math.ceil(timeout_s) + 1,
                "memory": memory_mb * 2**20,
                # RLIMIT_NPROC counts every task of the real uid: without a uid of its own, allow for the
                # ones the user already runs (the audit hook is what stops forks there)
                "nproc": max_processes + (0 if uid is not None else sum(n for _, _, n in _processes(os.getuid()))),
                "fsize": FILE_SIZE_LIMIT,
                "nofile": OPEN_FILES_LIMIT,
                "uid": uid,
                "forbid_exit": forbid_exit,
            }
            return _execute(plan, workdir, uid, config, stdin.encode(), timeout_s, max_output_bytes)
        finally:
            _remove_tree(workdir)


def _execute(plan: _Plan, workdir: str, uid: int | None, config: dict, stdin: bytes, timeout_s: float,
             cap: int) -> SandboxResult:
    report_r, report_w = os.pipe()  # the bootstrap reports its layers here, then closes it
    config["report_fd"] = report_w
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
    start = time.monotonic()
    try:
        # no preexec_fn: it is unsafe with threads, and sandboxes run from thread pools; the limits are
        # set by the bootstrap instead, before any untrusted code runs
        proc = subprocess.Popen(
            [plan.interpreter, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
            start_new_session=True, pass_fds=(report_w,),
        )
    except OSError as e:
        os.close(report_r)
        raise HematError(f"cannot start the sandbox interpreter {plan.interpreter}: {e}") from None
    finally:
        os.close(report_w)

    def kill_all() -> None:
        # the leader is not reaped yet (waitid WNOWAIT below), so its pid still names this group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if uid is not None:
            _kill_uid(uid, plan.interpreter)

    try:
        out, err, reason, duration = _communicate(proc, stdin, start, timeout_s, cap, kill_all)
    finally:
        kill_all()
        proc.wait()
        kill_all()  # a leftover may have forked while the leader was being reaped
        os.set_blocking(report_r, False)
        try:
            isolation = tuple(json.loads(os.read(report_r, 4096) or b"[]"))
        except (BlockingIOError, ValueError):
            isolation = ()
        os.close(report_r)
    returncode = proc.returncode
    stderr = err.decode("utf-8", "replace")
    if reason is None and returncode == -signal.SIGXCPU:
        reason = "cpu"
    if reason is None and returncode != 0 and stderr.rstrip().rsplit("\n", 1)[-1].startswith("MemoryError"):
        reason = "memory"
    _warn_missing(isolation, uid is not None)
    return SandboxResult(
        ok=returncode == 0 and reason is None,
        returncode=returncode,
        stdout=_capped_text(out, cap),
        stderr=_capped_text(err, cap),
        timed_out=reason in ("wall-clock", "cpu"),
        killed_reason=reason,
        duration_s=duration,
        isolation=isolation,
    )


def _communicate(proc: subprocess.Popen, stdin: bytes, start: float, timeout_s: float, cap: int, kill_all):
    """Feed stdin and read stdout/stderr until both close, without threads (a thread stuck on a pipe a
    leftover process holds could not be stopped). Kills on the wall clock and when output passes cap."""
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stdin_fd = proc.stdin.fileno()
    deadline = start + timeout_s
    reason, killed_at, exited_at = None, None, None
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        view = memoryview(stdin)
        while True:
            if exited_at is None and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                exited_at = time.monotonic()
                kill_all()  # the program is done: whatever it left behind goes now
                killed_at = exited_at
            now = time.monotonic()
            if killed_at is None and now >= deadline:
                reason, killed_at = "wall-clock", now
                kill_all()
            if exited_at is not None and not selector.get_map():
                break
            if killed_at is not None and now >= killed_at + DRAIN_S:
                break  # something outside our reach holds the pipes; stop listening
            if not selector.get_map():
                time.sleep(0.01)  # the program closed its pipes but is still running
                continue
            for key, _ in selector.select(timeout=0.05):
                if key.fd == stdin_fd:
                    try:
                        view = view[os.write(key.fd, view[:65536]) :]
                    except BrokenPipeError:
                        view = view[:0]  # the program stopped reading: fine
                    if not view:
                        selector.unregister(key.fd)
                        proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fd)
                    continue
                buffers[key.fd] += data
                if len(buffers[key.fd]) > cap and reason is None:
                    reason = "output"
                    if killed_at is None:
                        killed_at = time.monotonic()
                    kill_all()
                del buffers[key.fd][cap + 1 :]  # one byte over the cap marks truncation
    if not proc.stdin.closed:
        proc.stdin.close()
    duration = (exited_at or killed_at or time.monotonic()) - start
    return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), reason, duration


def _capped_text(data: bytes, cap: int) -> str:
    if len(data) <= cap:
        return data.decode("utf-8", "replace")
    return data[:cap].decode("utf-8", "replace") + TRUNCATED.format(cap)


@cache
def _plan() -> _Plan:
    """Which interpreter runs the sandbox, and as whom. As root the interpreter must be usable by an
    unprivileged uid: a pyenv or venv under /root often is not, so fall back to a system python3."""
    if os.geteuid() != 0:
        log.warning("hemat sandbox: not running as root, so no separate uid or network namespace; "
                    "untrusted code is contained by rlimits and the audit hook only")
        return _Plan(sys.executable, drop_uid=False)
    candidates = [os.path.realpath(sys.executable), os.path.realpath(getattr(sys, "_base_executable", ""))]
    candidates += [shutil.which("python3", path=p) or "" for p in ("/usr/local/bin", "/usr/bin", "/bin")]
    for candidate in dict.fromkeys(c for c in candidates if c):
        if _usable_by_unprivileged(candidate):
            return _Plan(candidate, drop_uid=True)
    log.warning("hemat sandbox: no Python interpreter is usable by an unprivileged uid (%s); running "
                "untrusted code as root, contained by rlimits, a network namespace and the audit hook only",
                ", ".join(dict.fromkeys(candidates)))
    return _Plan(sys.executable, drop_uid=False)


def _usable_by_unprivileged(interpreter: str) -> bool:
    probe = "import sys, json, collections, resource; print(sys.version_info >= (3, 8))"
    try:  # as nobody: a sandbox uid has the same ("other") access to the interpreter and its stdlib
        done = subprocess.run([interpreter, "-I", "-S", "-c", probe], user=65534, group=65534,
                              extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and done.stdout.strip() == b"True"


@contextlib.contextmanager
def _claim_uid():
    """Hold a sandbox uid for one run. The claim is an abstract unix socket bound to a name made from
    the uid: it spans processes, and the kernel drops it when its holder dies, leaving no files."""
    for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_COUNT):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            claim.bind(f"\0hemat-sandbox-uid-{uid}")
        except OSError:
            claim.close()
            continue
        if _uid_has_user(uid) or _live_processes(uid, zombies=True):
            claim.close()  # someone else's uid, or leftovers of a crashed run: leave it alone
            continue
        try:
            yield uid
        finally:
            claim.close()
        return
    raise HematError(f"no free sandbox uid in {SANDBOX_UID_BASE}..{SANDBOX_UID_BASE + SANDBOX_UID_COUNT - 1}")


def _uid_has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _live_processes(uid: int, zombies: bool = False) -> list[int]:
    """Pids of processes whose real, effective or saved uid is `uid`; zombies only if asked (they are
    dead, but still count against RLIMIT_NPROC until reaped)."""
    return [pid for pid, state, _ in _processes(uid) if zombies or state != "Z"]


def _processes(uid: int) -> list[tuple[int, str, int]]:
    """(pid, state letter, thread count) of each process whose real, effective or saved uid is `uid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue  # it just exited
        if str(uid) in status.get("Uid", "").split()[:3]:
            found.append((int(entry), status.get("State", "?").split()[0], int(status.get("Threads", 1))))
    return found


def _kill_uid(uid: int, interpreter: str) -> None:
    """Kill every process of a claimed sandbox uid, including ones that left the session with setsid.
    kill(-1) sent *as that uid* reaches exactly its processes, atomically, so no fork can outrun it."""
    for _ in range(20):
        if not _live_processes(uid):
            return
        subprocess.run([interpreter, "-I", "-S", "-c", "import os; os.kill(-1, 9)"], user=uid, group=uid,
                       extra_groups=[], cwd="/", env={}, capture_output=True, timeout=30)
        time.sleep(0.01)
    log.warning("hemat sandbox: processes of sandbox uid %d survived SIGKILL: %s", uid, _live_processes(uid))


def _remove_tree(path: str) -> None:
    # without root, a program that made its own directories read-only would otherwise block removal
    os.chmod(path, 0o700)
    for parent, dirnames, _ in os.walk(path):
        for name in dirnames:
            if not os.path.islink(os.path.join(parent, name)):
                os.chmod(os.path.join(parent, name), 0o700)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        log.warning("hemat sandbox: could not remove %s", path)


_warned: set[tuple[str, ...]] = set()


def _warn_missing(isolation: tuple[str, ...], dropped_uid: bool) -> None:
    expected = ("netns", "rlimits", "uid", "audit") if dropped_uid else ("rlimits", "audit")
    missing = tuple(layer for layer in expected if layer not in isolation)
    if missing and missing not in _warned:
        _warned.add(missing)
        log.warning("hemat sandbox: runs are missing isolation layers %s", ", ".join(missing))
