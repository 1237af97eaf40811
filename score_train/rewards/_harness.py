# The candidate's side of the sandbox (any Python >= 3.8, stdlib only). It lowers its own resource
# limits, runs solution.py, then serves the trusted test runner's requests (call a function, read an
# attribute, ...) over two pipes until the runner hangs up. Nothing here decides a verdict: all of
# this process, this file included, is the candidate's to tamper with, and the runner (another
# process in another sandbox) trusts only the plain data it decodes itself.
import builtins
import json
import os
import resource
import signal
import sys
import traceback

_cfg = json.loads(sys.argv[1])
_pid = os.getpid()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _seccomp  # noqa: E402
import _wire  # noqa: E402

try:  # before any program text runs: the caller's and other samples' keyrings are out of its reach
    _why = _seccomp.deny_keyrings()
except Exception as e:  # no ctypes in this interpreter
    _why = "seccomp: %s" % (e,)
if _why is not None:
    sys.stderr.write("sandbox: keyring calls not filtered (%s)\n" % (_why,))

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

_rf = os.fdopen(_cfg["rfd"], "rb")
_wf = os.fdopen(_cfg["wfd"], "wb")
_table = []


def _handle(x):
    # numpy scalars and the like travel as their plain value; everything else as a handle
    for base in (bool, int, float, str):
        if isinstance(x, base):
            return _wire.encode(base(x), _handle)
    item = getattr(x, "item", None)
    if callable(item) and type(x).__module__ == "numpy":
        try:
            return _wire.encode(item(), _handle)
        except Exception:
            pass
    _table.append(x)
    return {"h": len(_table) - 1}


def _enc(x):
    return _wire.encode(x, _handle)


def _dec(v):
    return _wire.decode(v, lambda i: _table[i])


def _flush():
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass


def _serve(req):
    op = req.get("op")
    obj = _table[req["h"]]
    if op == "call":
        return obj(*[_dec(a) for a in req["a"]], **{k: _dec(v) for k, v in req["k"]})
    if op == "getattr":
        return getattr(obj, req["n"])
    if op == "iter":
        return list(obj)
    if op == "len":
        return len(obj)
    if op == "getitem":
        return obj[_dec(req["k"])]
    if op == "bool":
        return bool(obj)
    raise ValueError("unknown request %r" % (op,))


with open("solution.py", encoding="utf-8") as _f:
    _src = _f.read()
_ns = {"__name__": "__main__", "__builtins__": builtins}
_load = None
try:
    exec(compile(_src, "solution.py", "exec"), _ns)
except AssertionError:
    traceback.print_exc()
    _load = "failed"
except MemoryError:
    sys.stderr.write("MemoryError\n")
    _load = "memory"
except SystemExit as e:
    sys.stderr.write("SystemExit(%r) before the tests\n" % (e.code,))
    _load = "exit"
except BaseException:
    traceback.print_exc()
    _load = "error"
if os.getpid() != _pid:  # a forked child of the program does not speak for it
    _flush()
    os._exit(1)
_flush()
if _load is not None:
    _wire.send(_wf, {"load": _load})
    os._exit(0)

_manifest = []
for _k, _v in list(_ns.items()):
    if _k.startswith("__"):
        continue
    if type(_v) is type(sys):
        _manifest.append([_k, "m", getattr(_v, "__name__", "")])
    else:
        try:
            _manifest.append([_k, "v", _enc(_v)])
        except Exception:
            pass
_wire.send(_wf, {"ready": _manifest})

while True:
    try:
        _req = _wire.recv(_rf)
    except Exception:
        break
    if _req is None:
        break
    try:
        _out = {"r": _enc(_serve(_req))}
    except MemoryError:
        _out = {"e": ["MemoryError", ""]}
    except BaseException as e:  # SystemExit too: the call did not return a value
        traceback.print_exc()
        _out = {"e": [type(e).__name__, str(e)[:2000]]}
    if os.getpid() != _pid:
        _flush()
        os._exit(1)
    _flush()
    try:
        _wire.send(_wf, _out)
    except Exception:
        break
_flush()
os._exit(0)
