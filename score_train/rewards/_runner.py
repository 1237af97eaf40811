# The trusted test runner (any Python >= 3.8, stdlib only). It runs in its own sandbox, in an
# interpreter the candidate's code never runs in, and reads the tests from stdin (they are in no file
# the candidate could open). The candidate's module-level names arrive as plain data or as handles;
# every call into the candidate is a request over a pipe whose answer is decoded here into plain
# values of this interpreter's own types. So the tests' control flow, their comparisons and this
# process's exit status are computed only here, and the candidate can influence them only through
# the values its functions return. Exit status (the verdict the caller reads):
#   0 every test ran to the end, 1 a test failed (AssertionError) or the program exited early,
#   2 any other error, 3 MemoryError, 4 the candidate's process died or broke the protocol.
# What the program names is trusted for nothing: only plain names cross (_plain), modules are this
# interpreter's own stdlib imports, and its exceptions arrive as the one type ProgramError.
import builtins
import json
import keyword
import os
import resource
import signal
import sys
import traceback

_cfg = json.loads(sys.argv[1])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _wire  # noqa: E402


def _undumpable():
    # A process of the same user (the basic fallback) may not ptrace us or read /proc/PID/mem.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass


_undumpable()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
for _name, _val in _cfg["limits"].items():
    resource.setrlimit(getattr(resource, _name), (_val, _val))

_tests = sys.stdin.read()
try:
    os.ftruncate(0, 0)  # stdin is the caller's anonymous file of the tests: leave nothing to reopen
except OSError:
    pass
_rf = os.fdopen(_cfg["rfd"], "rb")
_wf = os.fdopen(_cfg["wfd"], "wb")


class CandidateGone(BaseException):
    """The candidate's process ended or broke the protocol. A BaseException, so that a test's
    `except Exception` cannot swallow it; and it is also recorded, so no verdict can pass after it."""


class ProgramError(Exception):
    """Every exception the program raises reaches the tests as this one type, its name in the message:
    no builtin's meaning (StopIteration ending a map, AssertionError, KeyboardInterrupt) crosses."""

    def __init__(self, name, msg):
        Exception.__init__(self, "%s: %s" % (name, msg))
        self.name = name


# The data model's own signals, where a proxied object cannot do what was asked: len() of an object
# without one is a TypeError to list() (which then iterates), a missing attribute an AttributeError to
# hasattr and getattr(..., default). Only these, only from these operations, cross as themselves.
_PROTOCOL = {"len": TypeError, "iter": TypeError, "getattr": AttributeError}


_state = {"gone": None, "memory": False}


def _raise_remote(name, msg):
    if name == "MemoryError":
        _state["memory"] = True
        raise MemoryError(msg)
    raise ProgramError(name, msg)


def _gone(why):
    if _state["gone"] is None:
        _state["gone"] = why
    raise CandidateGone(why)


def _rpc(req):
    if _state["gone"] is not None:
        raise CandidateGone(_state["gone"])
    try:
        _wire.send(_wf, req)
        resp = _wire.recv(_rf)
    except (OSError, ValueError, _wire.WireError) as e:
        _gone("protocol: %s" % (e,))
    if resp is None:
        _gone("the program's process ended during the tests")
    if set(resp) == {"r"}:
        try:
            return _wire.decode(resp["r"], Remote)
        except (ValueError, TypeError, RecursionError, _wire.WireError) as e:
            _gone("protocol: %s" % (e,))
    if set(resp) == {"e"} and type(resp["e"]) is list and len(resp["e"]) == 2 \
            and all(type(s) is str for s in resp["e"]):
        _raise_remote(*resp["e"])
    _gone("protocol: malformed response")


def _enc(x):
    def handle(v):
        if type(v) is Remote:
            return {"h": object.__getattribute__(v, "_id")}
        raise TypeError("cannot pass a %s to the sandboxed program (plain data only)" % (type(v).__name__,))
    return _wire.encode(x, handle)


class Remote:
    """A value that lives in the candidate's process. It answers calls, attribute reads, iteration,
    len, indexing and truth through the candidate; equality and hashing stay identity here, so no
    object of the candidate's can claim to equal anything."""
    __slots__ = ("_id",)

    def __init__(self, i):
        object.__setattr__(self, "_id", i)

    def _ask(self, op, **kw):
        kw.update(op=op, h=object.__getattribute__(self, "_id"))
        try:
            return _rpc(kw)
        except ProgramError as e:
            cls = _PROTOCOL.get(op)
            if cls is not None and e.name == cls.__name__:
                raise cls(str(e)) from None
            raise

    def __call__(self, *args, **kwargs):
        return self._ask("call", a=[_enc(a) for a in args], k=[[k, _enc(v)] for k, v in kwargs.items()])

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", n=name)

    def __iter__(self):
        out = self._ask("iter")
        if type(out) is not list:
            raise TypeError("iteration did not give a list")
        return iter(out)

    def __len__(self):
        out = self._ask("len")
        if type(out) is not int:
            raise TypeError("len() did not give an int")
        return out

    def __getitem__(self, key):
        return self._ask("getitem", k=_enc(key))

    def __bool__(self):
        return bool(self._ask("bool"))

    def __repr__(self):
        return "<sandboxed object %d>" % (object.__getattribute__(self, "_id"),)


def _finish(code):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    if _state["gone"] is not None:
        code = 4
    elif _state["memory"]:
        code = 3
    os._exit(code)


try:
    _first = _wire.recv(_rf)
except Exception as e:
    sys.stderr.write("sandbox protocol error: %s\n" % (e,))
    _state["gone"] = "protocol"
    _finish(4)
if _first is None:
    sys.stderr.write("the program's process ended before the tests\n")
    _state["gone"] = "ended"
    _finish(4)
if "load" in _first:
    _finish({"failed": 1, "exit": 1, "memory": 3}.get(_first.get("load"), 2))

_stdlib = getattr(sys, "stdlib_module_names", frozenset())
# stdlib modules whose import runs a program (a browser, a GUI, a demo): never imported for a name
_RUNS_ON_IMPORT = frozenset(("antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle"))


def _plain(name):
    """A name the program may hand the tests: an identifier, no keyword, no leading underscore
    (so never __builtins__, __name__ or a dunder the interpreter reads)."""
    return type(name) is str and name.isidentifier() and not name.startswith("_") \
        and not keyword.iskeyword(name)


def _import_here(name):
    """This interpreter's own stdlib module `name`, or None. Never a __main__ or private module, and
    nothing the import raises (SystemExit included) reaches the verdict."""
    parts = name.split(".") if type(name) is str else [None]
    if not all(_plain(p) for p in parts) or parts[0] not in _stdlib or parts[0] in _RUNS_ON_IMPORT:
        return None
    try:
        return __import__(name, fromlist=["_"])
    except BaseException:
        return None


_names = {}
try:
    for _entry in _first["ready"]:
        _k, _kind, _v = _entry
        if not _plain(_k) or hasattr(builtins, _k):
            continue  # the tests' abs, len, isinstance, ValueError, ... stay the real ones
        if _k in _stdlib:
            # a stdlib module's name (`import math` in a prompt the tests rely on) is always this
            # interpreter's module, never a look-alike object of the program's
            _mod = _import_here(_k)
            if _mod is not None:
                _names[_k] = _mod
        elif _kind == "m":
            _mod = _import_here(_v)
            if _mod is not None:
                _names[_k] = _mod
        elif _kind == "v":
            _names[_k] = _wire.decode(_v, Remote)
except Exception as e:
    sys.stderr.write("sandbox protocol error: %s\n" % (e,))
    _state["gone"] = "protocol"
    _finish(4)
_globals = dict(_names, __name__="__main__", __builtins__=builtins)  # the real builtins, always

try:
    exec(compile(_tests, "tests.py", "exec"), _globals)
except AssertionError:
    traceback.print_exc()
    _finish(1)
except MemoryError:
    sys.stderr.write("MemoryError\n")
    _finish(3)
except CandidateGone as e:
    sys.stderr.write("%s\n" % (e,))
    _finish(4)
except SystemExit as e:
    sys.stderr.write("SystemExit(%r) before the tests finished\n" % (e.code,))
    _finish(1)
except BaseException:
    traceback.print_exc()
    _finish(2)
_finish(0)
