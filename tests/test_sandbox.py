"""The code sandbox: real child processes running real hostile programs. Every hostile program must be
contained, scored as a failure, and leave nothing behind (no process of its session, no temp dir, no file
it tried to create outside)."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import hemat
from hemat.errors import HematError
from hemat.eval import sandbox
from hemat.eval.sandbox import check_program, run_python

PROJECT = Path(hemat.__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(
    not (IS_ROOT and sandbox._plan().drop_uid), reason="needs root and an interpreter an unprivileged uid can run"
)

# Hostile programs start with this line so the test can find what they might leave behind.
ANNOUNCE = "import os\nprint('SANDBOX', os.getpid(), os.getcwd(), flush=True)\n"


def session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) == sid:
                members.append(int(entry))
    return members


def assert_contained(result):
    """Failed, and left no process of its session and no working directory."""
    assert not result.ok, result
    line = next(line for line in result.stdout.splitlines() if line.startswith("SANDBOX "))
    _, pid, cwd = line.split(" ", 2)
    assert session_members(int(pid)) == []
    assert not Path(cwd).exists()


def test_correct_program_passes_and_its_workdir_is_removed():
    result = run_python("import os\nprint(sum(range(10)))\nprint(os.getcwd())")
    assert result.ok and result.returncode == 0
    total, cwd = result.stdout.split()
    assert total == "45"
    assert Path(cwd).name.startswith("hemat-sandbox-") and not Path(cwd).exists()
    assert not result.timed_out and result.killed_reason is None


def test_failing_assertion_fails():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'")
    assert not result.ok and result.returncode == 1
    assert "AssertionError: arithmetic" in result.stderr
    assert 'main.py", line 1' in result.stderr and "<string>" not in result.stderr  # no bootstrap frames


def test_stdin_reaches_the_program():
    lines = "".join(f"{i}\n" for i in range(20000))  # bigger than a pipe buffer
    result = run_python("import sys\nprint(sum(int(x) for x in sys.stdin))", stdin=lines)
    assert result.ok and result.stdout.strip() == str(sum(range(20000)))


def test_exit_codes_follow_the_program():
    assert run_python("import sys\nsys.exit(0)").ok
    result = run_python("import sys\nsys.exit(3)")
    assert not result.ok and result.returncode == 3


def test_environment_is_scrubbed():
    os.environ["HEMAT_SANDBOX_SECRET"] = "leak"
    try:
        result = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)")
    finally:
        del os.environ["HEMAT_SANDBOX_SECRET"]
    names, isolated = result.stdout.splitlines()
    assert result.ok and eval(names) == ["HOME", "LANG", "PATH", "TMPDIR"] and isolated == "1"


def test_infinite_loop_is_stopped_by_the_wall_clock():
    result = run_python(ANNOUNCE + "while True:\n    pass", timeout_s=1)
    assert result.timed_out and result.killed_reason == "wall-clock"
    assert_contained(result)


def test_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_python(ANNOUNCE + "import time\ntime.sleep(60)", timeout_s=1)
    assert result.killed_reason == "wall-clock"
    assert_contained(result)


def test_cpu_limit_kills_a_busy_loop():
    # generous wall clock: the CPU limit (1 s of CPU) must be what stops it
    result = run_python(ANNOUNCE + "while True:\n    pass", timeout_s=20, cpu_s=1)
    assert result.killed_reason == "cpu" and result.returncode == -signal.SIGXCPU and result.timed_out
    assert_contained(result)


@pytest.mark.parametrize(
    "bomb",
    [
        "while True:\n    os.fork()",
        "import subprocess\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])",
        "import multiprocessing\nwhile True:\n    multiprocessing.Process(target=print).start()",
        "os.system('sleep 60 &')",
        "os.posix_spawn('/bin/sleep', ['sleep', '60'], {})",
        "import ctypes\nctypes.CDLL(None).fork()",
        "import pty\npty.fork()",
    ],
    ids=["fork", "subprocess", "multiprocessing", "system", "posix_spawn", "ctypes", "pty"],
)
def test_fork_bomb_is_contained(bomb):
    result = run_python(ANNOUNCE + "import sys\n" + bomb, timeout_s=2, max_processes=8)
    assert result.returncode == 1 and "PermissionError" in result.stderr
    assert_contained(result)


def test_memory_hog_fails_with_memory_reason():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))"
    result = run_python(ANNOUNCE + hog, memory_mb=128, timeout_s=3)
    assert result.killed_reason == "memory" and "MemoryError" in result.stderr
    assert_contained(result)


def test_huge_single_allocation_fails():
    result = run_python(ANNOUNCE + "x = bytearray(8 * 2**30)", memory_mb=128, timeout_s=3)
    assert result.killed_reason == "memory"
    assert_contained(result)


@pytest.fixture
def secrets(tmp_path):
    root_only_file = tmp_path / "secret.txt"
    root_only_file.write_text("TOP-SECRET-1")
    root_only_file.chmod(0o600)
    sibling = Path("/tmp") / f"hemat-test-sibling-{uuid.uuid4().hex}.txt"
    sibling.write_text("TOP-SECRET-2")
    sibling.chmod(0o644)
    yield root_only_file, sibling
    sibling.unlink()


@pytest.mark.parametrize(
    "read",
    [
        "print(open(SECRET).read())",
        "print(open(os.path.join('..', os.path.basename(SIBLING))).read())",
        "print(open(SIBLING, 'rb').read())",
        "fd = os.open(SIBLING, os.O_RDONLY)\nprint(os.read(fd, 100))",
        "import pathlib\nprint(pathlib.Path(SIBLING).read_text())",
        "print(open('/etc/passwd').read())",
        "print(open('/proc/1/environ').read())",
        "print(open(os.path.join(PROJECT, 'pyproject.toml')).read())",
        "print(os.listdir('/'))",
        "os.chdir('/tmp')\nprint(open(os.path.basename(SIBLING)).read())",
    ],
    ids=["root-only", "dotdot", "bytes-mode", "os.open", "pathlib", "passwd", "proc", "project", "listdir", "chdir"],
)
def test_reading_outside_the_sandbox_is_refused(secrets, read):
    secret, sibling = secrets
    setup = f"SECRET, SIBLING, PROJECT = {str(secret)!r}, {str(sibling)!r}, {str(PROJECT)!r}\n"
    result = run_python(ANNOUNCE + setup + read, timeout_s=3)
    assert "TOP-SECRET" not in result.stdout and "root:" not in result.stdout
    assert "PermissionError" in result.stderr
    assert_contained(result)


def test_patching_builtins_and_os_does_not_disarm_the_guard():
    patch = "import builtins, os.path\nbuiltins.any = builtins.isinstance = lambda *a: True\n"
    patch += "os.path.realpath = os.path.normpath = os.getcwd = os.fspath = lambda *a: '/tmp'\n"
    result = run_python(ANNOUNCE + patch + "print(open('/etc/passwd').read())", timeout_s=3)
    assert "PermissionError" in result.stderr and "root:" not in result.stdout
    assert_contained(result)


def test_stdlib_imports_still_work():
    code = "import json, collections, itertools, re, math, heapq, fractions, decimal, typing, dataclasses\n"
    code += "print(json.dumps(collections.Counter('aab').most_common(1)))"
    result = run_python(code)
    assert result.ok, result.stderr
    assert json.loads(result.stdout) == [["a", 2]]


def test_files_inside_the_workdir_are_allowed():
    code = "import pathlib, tempfile\npathlib.Path('a/b').mkdir(parents=True)\nopen('a/b/x.txt', 'w').write('hi')\n"
    code += "print(open('a/b/x.txt').read(), sorted(os.listdir('.')))\n"
    code += "with tempfile.TemporaryFile() as f:\n    f.write(b'x')"
    result = run_python("import os\n" + code)
    assert result.ok, result.stderr
    assert result.stdout.strip() == "hi ['a', 'main.py']"


@pytest.mark.parametrize(
    "write",
    [
        "open(TARGET, 'w').write('pwned')",
        "open(TARGET, 'a').write('pwned')",
        "os.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
        "import pathlib\npathlib.Path(TARGET).write_text('pwned')",
        "os.mkdir(TARGET)",
        "os.rename('main.py', TARGET)",
        "import shutil\nshutil.copy('main.py', TARGET)",
        "os.symlink('/etc/passwd', 'link')\nprint(open('link').read())",
        "open(os.path.join('..', os.path.basename(TARGET)), 'w').write('pwned')",
    ],
    ids=["open-w", "open-a", "os.open", "pathlib", "mkdir", "rename", "shutil", "symlink", "dotdot"],
)
@pytest.mark.parametrize("where", ["project", "test-tmp", "tmp", "dev-shm"])
def test_writing_outside_the_sandbox_is_refused(tmp_path, write, where):
    name = f"hemat-sandbox-escape-{uuid.uuid4().hex}"
    target = {"project": PROJECT, "test-tmp": tmp_path, "tmp": Path("/tmp"), "dev-shm": Path("/dev/shm")}[where] / name
    result = run_python(ANNOUNCE + f"TARGET = {str(target)!r}\n" + write, timeout_s=3)
    assert "PermissionError" in result.stderr
    assert_contained(result)
    assert not target.exists() and not (Path("/tmp") / name).exists()


@pytest.mark.parametrize(
    "attack",
    [
        "s = socket.create_connection(('127.0.0.1', PORT), timeout=1)\ns.sendall(b'hello')",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('127.0.0.1', PORT))",
        "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=1)",
        "socket.getaddrinfo('example.com', 80)",
        "import _socket\n_socket.socket()",
    ],
    ids=["tcp", "udp", "urllib", "dns", "_socket"],
)
def test_network_is_refused(attack):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        result = run_python(ANNOUNCE + f"import socket\nPORT = {port}\n" + attack, timeout_s=3)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    assert "PermissionError" in result.stderr
    assert_contained(result)


@pytest.fixture
def signal_recorder():
    received = []
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, lambda sig, frame: received.append(sig)) for sig in watched}
    yield received
    for sig, handler in previous.items():
        signal.signal(sig, handler)


ATTACKS = {
    "kill-parent": "os.kill(os.getppid(), signal.SIGTERM)",
    "killpg-parent": "os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)",
    "kill-group-0": "os.kill(0, signal.SIGTERM)",
    "pidfd": "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGTERM)",
    "prlimit-parent": "import resource\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
}
if IS_ROOT:  # kill(-1) as the sandbox uid reaches only its own processes; without root it would be ours
    ATTACKS["kill-everyone"] = "os.kill(-1, signal.SIGTERM)"


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_signalling_the_parent_is_refused(signal_recorder, attack):
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = run_python(ANNOUNCE + "import signal\n" + attack, timeout_s=3)
    assert signal_recorder == []
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == nofile
    assert result.returncode == 1 and ("PermissionError" in result.stderr or "AttributeError" in result.stderr)
    assert_contained(result)


def test_killing_itself_is_a_failure():
    result = run_python(ANNOUNCE + "import signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert result.returncode == -signal.SIGKILL
    assert_contained(result)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_is_capped_and_the_program_killed(stream):
    flood = f"import sys\nwhile True:\n    sys.{stream}.write('x' * 10**6)"
    result = run_python(ANNOUNCE + flood, max_output_bytes=10_000, timeout_s=5)
    assert result.killed_reason == "output" and not result.timed_out
    text = getattr(result, stream)
    assert text.endswith(sandbox.TRUNCATED.format(10_000))
    assert len(text.encode()) <= 10_000 + len(sandbox.TRUNCATED.format(10_000))
    assert_contained(result)


HUMANEVAL_TESTS = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
"""


def test_check_program_humaneval_style():
    passing = check_program("def add(a, b):\n    return a + b\n", HUMANEVAL_TESTS, "add", timeout_s=3)
    assert passing.ok, passing.stderr
    failing = check_program("def add(a, b):\n    return a - b\n", HUMANEVAL_TESTS, "add", timeout_s=3)
    assert not failing.ok and "AssertionError" in failing.stderr
    asserts_only = check_program("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3", timeout_s=3)
    assert asserts_only.ok


@pytest.mark.parametrize("escape", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_check_program_fails_a_program_that_exits_before_its_tests(escape):
    result = check_program(escape + "\ndef add(a, b):\n    return 0\n", HUMANEVAL_TESTS, "add", timeout_s=3)
    assert not result.ok and result.returncode == 1


@pytest.mark.parametrize(
    "hack",
    [
        "import sys\nsys.excepthook = lambda *a: sys.exit(0)",
        "import builtins, sys\nbuiltins.print = lambda *a, **k: sys.exit(0)\nsys.exit(1)",
    ],
    ids=["excepthook", "print"],
)
def test_check_program_status_cannot_be_forged(hack):
    result = check_program(hack + "\ndef add(a, b):\n    return 0\n", HUMANEVAL_TESTS, "add", timeout_s=3)
    assert not result.ok and result.returncode == 1


def test_check_program_times_out():
    result = check_program("def add(a, b):\n    while True:\n        pass\n", HUMANEVAL_TESTS, "add", timeout_s=1)
    assert not result.ok and result.timed_out


def test_concurrent_runs_have_separate_workdirs():
    code = "import os, sys\nopen(sys.stdin.read() + '.txt', 'w').close()\nprint(os.getcwd(), sorted(os.listdir('.')))"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(code, stdin=str(i), timeout_s=10), range(4)))
    cwds = set()
    for i, result in enumerate(results):
        assert result.ok, result.stderr
        cwd, listing = result.stdout.split(" ", 1)
        assert eval(listing) == [f"{i}.txt", "main.py"]
        cwds.add(cwd)
    assert len(cwds) == 4 and not any(Path(cwd).exists() for cwd in cwds)


def test_bad_arguments_are_named():
    with pytest.raises(HematError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(HematError, match="memory_mb"):
        run_python("pass", memory_mb=1)
    with pytest.raises(HematError, match="max_output_bytes"):
        run_python("pass", max_output_bytes=0)
    with pytest.raises(HematError, match="'add me'"):
        check_program("pass", "pass", entry_point="add me")


@root_only
def test_root_runs_get_every_layer_and_their_limits():
    code = "import os, resource\nprint(os.getuid(), os.getgid(), os.getgroups(), "
    names = ("RLIMIT_NPROC", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_CORE")
    code += f"[resource.getrlimit(getattr(resource, n)) for n in {names}])"
    result = run_python(code, memory_mb=256, cpu_s=2, max_processes=7)
    assert result.ok, result.stderr
    assert set(result.isolation) == {"netns", "rlimits", "uid", "audit"}
    uid, gid, groups, limits = result.stdout.split(" ", 3)
    assert sandbox.SANDBOX_UID_BASE <= int(uid) < sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_COUNT
    assert gid == uid and groups == "[]"
    assert eval(limits) == [(7, 7), (256 * 2**20, 256 * 2**20), (2, 3), (0, 0)]


@root_only
def test_leftovers_of_the_sandbox_uid_are_killed_and_nothing_else():
    plan = sandbox._plan()
    sleeper = [plan.interpreter, "-I", "-S", "-c", "import time; time.sleep(60)"]
    bystander = subprocess.Popen(sleeper, user=65534, group=65534, extra_groups=[], cwd="/")
    try:
        with sandbox._claim_uid() as uid:
            # stands for a child that left the sandbox's session with setsid
            escaped = subprocess.Popen(sleeper, user=uid, group=uid, extra_groups=[], start_new_session=True, cwd="/")
            sandbox._kill_uid(uid, plan.interpreter)
            assert escaped.wait(timeout=10) == -signal.SIGKILL
            assert sandbox._live_processes(uid) == []
        assert bystander.poll() is None  # a process of another uid is untouched
    finally:
        bystander.kill()
        bystander.wait()


@root_only
def test_without_root_the_audit_hook_still_contains_hostile_code():
    """The degraded mode, for real: the sandbox itself run by an unprivileged user. The child imports a
    world-readable copy of the package, since the checkout may sit under a directory only root can read."""
    plan = sandbox._plan()
    target = Path("/tmp") / f"hemat-sandbox-escape-{uuid.uuid4().hex}"
    readable = Path(tempfile.mkdtemp(prefix="hemat-sandbox-pkg-"))
    readable.chmod(0o755)
    shutil.copytree(PROJECT / "hemat", readable / "hemat", ignore=shutil.ignore_patterns("__pycache__"))
    driver = f"""
import json, sys
sys.path.insert(0, {str(readable)!r})
from hemat.eval.sandbox import run_python
attacks = ["open({str(target)!r}, 'w')", "import socket; socket.socket()", "import os; os.kill(os.getppid(), 9)",
           "import os; os.fork()", "print(open('/etc/passwd').read())", "print('fine')"]
print(json.dumps([[r.ok, r.stdout, r.stderr, list(r.isolation)] for r in map(run_python, attacks)]))
"""
    try:
        done = subprocess.run([plan.interpreter, "-c", driver], user=65534, group=65534, extra_groups=[], cwd="/",
                              env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(readable)
    assert done.returncode == 0, done.stderr
    assert "not running as root" in done.stderr  # the degradation is announced
    *attacks, fine = json.loads(done.stdout)
    for ok, stdout, stderr, isolation in attacks:
        assert not ok and "PermissionError" in stderr and "root:" not in stdout
        assert isolation == ["rlimits", "audit"]
    assert fine[0] and fine[1] == "fine\n"
    assert not target.exists()
