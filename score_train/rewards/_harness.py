# Runs inside the sandbox (any Python >= 3.8, stdlib only). Reads the run's nonce from stdin, lowers
# its own resource limits, then executes solution + tests. Exit codes: 0 the tests ran to the end
# (the nonce is then written to stdout), 1 a test failed (AssertionError) or the program exited early,
# 2 any other error, 3 MemoryError.
import json
import os
import resource
import signal
import sys
import traceback

_nonce = sys.stdin.readline().strip()
_cfg = json.loads(sys.argv[1])
_pid = os.getpid()

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write then fails with EFBIG instead of killing
for _name, _val in _cfg["limits"].items():
    resource.setrlimit(getattr(resource, _name), (_val, _val))

if _cfg["block_network"]:
    # Fallback where no network namespace could be made: every socket creation fails.
    import socket as _socket

    def _blocked(*a, **k):
        raise OSError(101, "network is disabled in the sandbox")

    _socket.socket = _blocked
    _socket.create_connection = _blocked
    _socket.socketpair = _blocked
    try:
        import _socket as _csock
        _csock.socket = _blocked
    except Exception:
        pass
    del _socket

with open("solution.py", encoding="utf-8") as _f:
    _src = _f.read()
with open("tests.py", encoding="utf-8") as _f:
    _src += "\n\n" + _f.read()


def _finish(code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


try:
    exec(compile(_src, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except AssertionError:
    traceback.print_exc()
    _finish(1)
except MemoryError:
    sys.stderr.write("MemoryError\n")
    _finish(3)
except SystemExit as e:
    sys.stderr.write("SystemExit(%r) before the tests finished\n" % (e.code,))
    _finish(1)
except BaseException:
    traceback.print_exc()
    _finish(2)
if os.getpid() != _pid:  # a forked child of the program must not report success
    _finish(1)
try:
    sys.stdout.flush()
except Exception:
    _finish(2)
os.write(1, ("\n" + _nonce + "\n").encode())
_finish(0)
