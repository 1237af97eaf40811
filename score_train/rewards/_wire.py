# The message format between the sandboxed candidate (_harness.py) and the trusted test runner
# (_runner.py): one JSON object per line. Stdlib only, Python >= 3.8: it runs in the sandbox's
# interpreter. Values are plain data with an explicit type tag, so that what the runner decodes is
# built by the runner's own interpreter from its own types: no pickle, no code, no objects whose
# methods the candidate wrote. Anything else travels as an opaque handle {"h": id}.
import base64
import json
import re

MAX_LINE = 32 * 2**20  # a longer message is a protocol error, not a reason to run out of memory
MAX_DEPTH = 200
_HEX = re.compile(r"-?[0-9a-f]+")


class WireError(Exception):
    pass


def encode(x, handle, depth=0):
    """x -> a JSON-able value. handle(obj) -> {"h": id} for values that are not plain data. Runs in
    the candidate (where it may be tampered with: the runner trusts only what decode builds)."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int or t is float:
        # hex: no int/str digit limit applies to it (decimal stops at 4,300 digits); MAX_LINE bounds it
        return {"x": "%x" % x} if t is int and abs(x) > 2**53 else x
    d = depth + 1
    if t is list:
        return {"l": [encode(v, handle, d) for v in x]}
    if t is tuple:
        return {"t": [encode(v, handle, d) for v in x]}
    if t is dict:
        return {"d": [[encode(k, handle, d), encode(v, handle, d)] for k, v in x.items()]}
    if t is set:
        return {"s": [encode(v, handle, d) for v in x]}
    if t is frozenset:
        return {"f": [encode(v, handle, d) for v in x]}
    if t is bytes:
        return {"b": base64.b64encode(x).decode("ascii")}
    if t is complex:
        return {"c": [x.real, x.imag]}
    return handle(x)


def decode(v, resolve, depth=0):
    """A JSON value -> plain data of exactly the tagged types; resolve(id) turns a handle into the
    receiving side's object for it."""
    if depth > MAX_DEPTH:
        raise WireError("value nested too deeply")
    if v is None or type(v) in (bool, str, int, float):
        return v
    if type(v) is not dict or len(v) != 1:
        raise WireError("malformed value")
    (tag, body), = v.items()
    d = depth + 1
    if tag == "x" and type(body) is str and _HEX.fullmatch(body):
        return int(body, 16)
    if tag == "h" and type(body) is int:
        return resolve(body)
    if tag == "b" and type(body) is str:
        return base64.b64decode(body.encode("ascii"), validate=True)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) in (int, float) for p in body):
        return complex(body[0], body[1])
    if type(body) is not list:
        raise WireError("malformed value")
    if tag == "l":
        return [decode(e, resolve, d) for e in body]
    if tag == "t":
        return tuple(decode(e, resolve, d) for e in body)
    if tag == "s":
        return set(decode(e, resolve, d) for e in body)
    if tag == "f":
        return frozenset(decode(e, resolve, d) for e in body)
    if tag == "d":
        out = {}
        for kv in body:
            if type(kv) is not list or len(kv) != 2:
                raise WireError("malformed dict item")
            out[decode(kv[0], resolve, d)] = decode(kv[1], resolve, d)
        return out
    raise WireError("unknown tag %r" % (tag,))


def send(f, msg):
    f.write(json.dumps(msg, separators=(",", ":")).encode("utf-8") + b"\n")
    f.flush()


def recv(f):
    """One message, or None at end of stream."""
    line = f.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise WireError("message too long or truncated")
    msg = json.loads(line.decode("utf-8"))
    if type(msg) is not dict:
        raise WireError("malformed message")
    return msg
