"""Math answers: extraction from a response and equivalence with the reference.

`is_equivalent` uses math-verify when it is installed. The fallback (also used when math-verify fails
on an input) compares normalised strings, then numbers (fractions, percentages, thousands
separators), tuples and intervals element by element, and finally sympy expressions parsed from a
strict whitelist of tokens (model output is untrusted; sympify would eval it).
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction

try:  # optional dependency
    import math_verify as _mv
except ImportError:  # pragma: no cover - exercised through backend="fallback"
    _mv = None

HAVE_MATH_VERIFY = _mv is not None

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FINAL = re.compile(r"(?:Final Answer\s*:\s*(?:The final answer is)?|The final answer is)\s*", re.IGNORECASE)
_HOPE = re.compile(r"\s*I hope it is correct", re.IGNORECASE)


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group whose '{' is at open_at (nested braces allowed); None if unclosed."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (or \\fbox{...}) in text."""
    for m in reversed(list(_BOXED.finditer(text or ""))):
        inner = _braced(text, m.end() - 1)
        if inner is not None:
            return inner.strip()
    return None


def _clean(ans: str) -> str:
    ans = ans.strip()
    inner = last_boxed(ans)
    if inner is not None:
        ans = inner
    ans = ans.strip().rstrip(".").strip().strip("$").strip()
    ans = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", ans).strip()
    return ans.rstrip(".").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response: whichever comes last of the last \\boxed{...} and the paper's
    "Final Answer: The final answer is $X$. I hope it is correct." form. None when neither is there."""
    if not text:
        return None
    cands = []  # (position, answer)
    for m in reversed(list(_BOXED.finditer(text))):
        inner = _braced(text, m.end() - 1)
        if inner is not None:
            cands.append((m.start(), inner.strip()))
            break
    finals = list(_FINAL.finditer(text))
    if finals:
        m = finals[-1]
        rest = text[m.end():]
        hope = _HOPE.search(rest)
        if hope:
            rest = rest[:hope.start()]
        else:
            rest = rest.split("\n\n")[0] if rest.strip() else rest
            rest = rest.strip().split("\n")[0] if "$" not in rest else rest
        rest = _clean(rest)
        if rest:
            cands.append((m.start(), rest))
    if not cands:
        return None
    return max(cands, key=lambda c: c[0])[1] or None


_NUMBER = re.compile(r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def last_number(text: str | None) -> str | None:
    """The last number written in text ("1,234" counts as 1234; a minus right after a digit, word or
    closing bracket is subtraction, not a sign: "82-5" ends with 5, "x = -5" with -5)."""
    found = _NUMBER.findall(text or "")
    return found[-1].replace(",", "") if found else None


def numbers_in(text: str | None) -> list[str]:
    """Every number written in text, in order (the last_number rule's candidates)."""
    return [x.replace(",", "") for x in _NUMBER.findall(text or "")]


def arithmetic_answer(text: str | None) -> str | None:
    """Lenient reading for the arithmetic task: a \\boxed{} / "Final Answer" answer takes priority
    (its last number when it has text around it), otherwise the last number of the whole response."""
    ans = extract_answer(text)
    if ans is not None:
        num = last_number(re.sub(r"\\[a-zA-Z]+", " ", ans))
        if num is not None:
            return num
    return last_number(text)


def numbers_equal(pred: str | None, gold: str) -> bool:
    try:
        return pred is not None and Fraction(pred.replace(",", "")) == Fraction(gold.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return False


# ---------------------------------------------------------------- normalisation (fallback path)

_UNIT_WORDS = (r"(?:cm|mm|km|m|meters?|inch(?:es)?|feet|foot|ft|units?|degrees?|dollars?|cents?|hours?|"
               r"minutes?|seconds?|days?|years?|sq|square|cubic|kg|g|grams?|pounds?|lbs?|miles?|mph)")


def normalize(ans: str | None) -> str:
    """Canonical string form of an answer: no $, \\left/\\right, spacing commands, \\text{} wrappers,
    degree signs, trailing units or periods; \\dfrac -> \\frac; lower-case."""
    if ans is None:
        return ""
    s = _clean(str(ans))
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = re.sub(r"\\(?:left|right|displaystyle)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{\s*" + _UNIT_WORDS + r"(?:\^?\d)?\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d)\s*" + _UNIT_WORDS + r"(?:\^?\d)?\s*$", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s.lower()


def _is_text(s: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z ]*[a-z]", s))


def _to_fraction(s: str) -> Fraction | None:
    s = s.replace(" ", "")
    pct = s.endswith("\\%") or s.endswith("%")
    s = s.removesuffix("\\%").removesuffix("%")
    s = re.sub(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$", r"\1\2/\3", s)
    s = re.sub(r"^(-?)\\frac(\d)(\d)$", r"\1\2/\3", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/-?\d+)?", s):
        return None
    try:
        f = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return f / 100 if pct else f


_ALLOWED_NAMES = {"sqrt", "pi", "e", "E", "I", "i", "oo", "log", "ln", "sin", "cos", "tan", "exp"}


def _latex_to_sympy_text(s: str) -> str | None:
    s = s.replace("\\pi", " pi ").replace("\\infty", " oo ").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("\\ln", " log").replace("\\log", " log").replace("\\sin", " sin").replace("\\cos", " cos")
    s = s.replace("\\tan", " tan").replace("\\exp", " exp")
    for _ in range(8):  # innermost first: \frac{a}{b}, \sqrt{a}, \sqrt[n]{a}
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        new = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in s or not re.fullmatch(r"[0-9a-zA-Z+\-*/(). ]*", s):
        return None
    for name in re.findall(r"[a-zA-Z]+", s):
        if name not in _ALLOWED_NAMES and len(name) > 1:
            return None
    return s


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                                standard_transformations)
    except ImportError:  # pragma: no cover
        return False
    ta, tb = _latex_to_sympy_text(a), _latex_to_sympy_text(b)
    if not ta or not tb or len(ta) > 200 or len(tb) > 200:
        return False
    tr = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        ea, eb = parse_expr(ta, transformations=tr), parse_expr(tb, transformations=tr)
        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        free = diff.free_symbols
        if not free:
            return abs(complex(sympy.N(diff))) < 1e-9
        return False
    except Exception:  # noqa: BLE001 - anything unparsable is simply not equal
        return False


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    return [p.strip() for p in parts]


def _rhs(s: str) -> str:
    # "x = 2" -> "2"; several "a=1, b=2" are left as they are (compared whole).
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if re.fullmatch(r"\s*[a-z](_\w+)?\s*", lhs):
            return rhs.strip()
    return s


def _fallback_equal(p: str, g: str, depth: int = 0) -> bool:
    if p == g:
        return True
    p, g = _rhs(p), _rhs(g)
    if p == g:
        return True
    fp, fg = _to_fraction(p), _to_fraction(g)
    if fp is not None and fg is not None:
        if fp == fg:
            return True
        # "50%" against "50": the percent sign is often dropped from one side
        pp, gp = p.endswith("%"), g.endswith("%")
        if pp != gp:
            return _to_fraction(p.rstrip("%").rstrip("\\")) == _to_fraction(g.rstrip("%").rstrip("\\"))
        return False
    # tuples, intervals, sets: same brackets, equal elements in order
    if depth < 2 and len(p) > 1 and len(g) > 1 and p[0] in "([{" and g[0] in "([{" and "," in p:
        if (p[0], p[-1]) != (g[0], g[-1]):
            return False
        pe, ge = _split_top(p[1:-1]), _split_top(g[1:-1])
        return len(pe) == len(ge) and all(_fallback_equal(a, b, depth + 1) for a, b in zip(pe, ge))
    if "," in p or "," in g:
        pe, ge = _split_top(p), _split_top(g)
        if len(pe) > 1 and len(pe) == len(ge):
            return all(_fallback_equal(a, b, depth + 1) for a, b in zip(pe, ge))
        return False
    return _sympy_equal(p, g)


def _math_verify_equal(p: str, g: str) -> bool | None:
    """True/False from math-verify, None when it could not parse one side."""
    main = threading.current_thread() is threading.main_thread()
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    tmo = 5 if main else None
    cfg = [_mv.LatexExtractionConfig(boxed_match_priority=0), _mv.ExprExtractionConfig()]
    try:
        gp = _mv.parse(f"${g}$", extraction_config=cfg, parsing_timeout=tmo)
        pp = _mv.parse(f"${p}$", extraction_config=cfg, parsing_timeout=tmo)
        if not gp or not pp:
            return None
        return bool(_mv.verify(gp, pp, timeout_seconds=tmo))
    except Exception:  # noqa: BLE001
        return None


_UNSAFE = re.compile(r"__|[\'\"`;@]|\b(?:lambda|import|exec|eval|open|getattr|globals)\b")


def is_equivalent(pred: str | None, gold: str | None, *, backend: str = "auto") -> bool:
    """Whether answer pred means the same as gold. backend: "auto" (math-verify if installed, else
    the fallback), "math_verify" or "fallback"."""
    if backend not in ("auto", "math_verify", "fallback"):
        raise ValueError(f"backend must be 'auto', 'math_verify' or 'fallback', got {backend!r}")
    if backend == "math_verify" and not HAVE_MATH_VERIFY:
        raise ImportError("math-verify is not installed")
    if pred is None or gold is None or len(str(pred)) > 1000:
        return False
    p, g = normalize(pred), normalize(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    # Words ("no", "yes", "alice") must match as words: as algebra "no" == "on" == n*o.
    if _is_text(p) or _is_text(g):
        return False
    # Defence in depth: math-verify hands extracted text to sympy's parse_expr, which evals; no math
    # answer needs dunders, quotes or statements.
    if _UNSAFE.search(str(pred)) or _UNSAFE.search(str(gold)):
        return False
    if backend != "fallback" and HAVE_MATH_VERIFY:
        r = _math_verify_equal(str(pred).strip().strip("$"), str(gold).strip().strip("$"))
        if r is not None:
            return r
    return _fallback_equal(p, g)


def math_reward(text: str | None, gold: str, *, backend: str = "auto") -> float:
    return 1.0 if is_equivalent(extract_answer(text), gold, backend=backend) else 0.0


def arithmetic_reward(text: str | None, gold: str) -> float:
    return 1.0 if numbers_equal(arithmetic_answer(text), gold) else 0.0
