# What the candidate does to itself before the program runs (stdlib only, Python >= 3.8: it runs in
# the sandbox's interpreter): it leaves the caller's session keyring for a fresh, empty one (so the
# caller's keys are no longer its own: /proc/keys stops listing them to another uid), then installs a
# seccomp filter that refuses the keyring system calls (add_key, request_key, keyctl) with EPERM, for
# the program and every process it starts: no key is read or planted in any keyring (session, the
# per-uid user keyring a later sample with the same uid would see, or any key by serial number). A
# filter cannot be removed once installed.
import ctypes
import platform
import struct

# (AUDIT_ARCH_*, syscall numbers of add_key, request_key, keyctl, first number of a second ABI or None)
_ARCH = {
    "x86_64": (0xC000003E, (248, 249, 250), 0x40000000),  # x32 syscalls: bit 30 set, all refused
    "aarch64": (0xC00000B7, (217, 218, 219), None),
}
_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_ALLOW, _ERRNO_EPERM, _KILL_PROCESS = 0x7FFF0000, 0x00050001, 0x80000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def _program(arch, nrs, second_abi):
    ins = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL_PROCESS), (_LD_ABS, 0, 0, 0)]
    checks = ([(_JGE, second_abi)] if second_abi is not None else []) + [(_JEQ, nr) for nr in nrs]
    for i, (op, k) in enumerate(checks):
        ins.append((op, len(checks) - i, 0, k))  # jump over the remaining checks and ALLOW, to EPERM
    ins += [(_RET, 0, 0, _ALLOW), (_RET, 0, 0, _ERRNO_EPERM)]
    return b"".join(struct.pack("HBBI", *i) for i in ins), len(ins)


def deny_keyrings():
    """Install the filter on this process; returns the reason when it could not be."""
    spec = _ARCH.get(platform.machine())
    if spec is None:
        return "no seccomp filter for machine %r" % (platform.machine(),)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code, n = _program(*spec)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = Prog(n, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(spec[1][2], 1, None)  # KEYCTL_JOIN_SESSION_KEYRING, anonymous: best effort, the filter decides
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 \
            or libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        return "prctl: errno %d" % (ctypes.get_errno(),)
    return None
