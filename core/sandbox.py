"""Rendering chat templates, which are untrusted code (a model folder's own, a user's custom Jinja),
with bounds on the work and memory one render may take.

The environment is transformers' for `apply_chat_template` (ImmutableSandboxedEnvironment,
trim/lstrip blocks, loop controls, its `tojson`, `raise_exception`, `strftime_now`, `dict` and
`namespace`), so a render is byte-identical to the tokenizer's own. On top of Jinja's sandbox,
which blocks unsafe attributes and ranges over 100,000 items but not growth, every render counts:

* steps: loop iterations, calls, filters and operators (a loop nested in a loop is the product);
* characters: every piece of output, literal or computed, wherever it is written (the top level,
  a macro, a `{% set %}` block), and the size of any value an operator, call or filter makes or
  takes (strings by length, containers by their elements, shared ones counted each time they
  appear, as printing them would);
* time, checked at each step.

`'A' * 10**9`, `x ~ x` doubled in a loop, `'a'|center(10**9)`, a list repeated into a DAG and then
printed: each stops with a TemplateLimit naming the bound, before the memory is taken. Deep
recursion stops at Python's recursion limit. The bounds grow with the conversation (a long chat
renders long), and what the sandbox cannot foresee (a comparison of two huge nested values, say)
is left to the process limits of whoever renders for someone else (core.worker).
"""

from __future__ import annotations

import contextvars
import functools
import json
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

from . import budget
from .budget import TemplateLimit

__all__ = ["TemplateLimit", "compile_template", "environment", "render"]

class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%", "//"})

    def call_binop(self, context, operator, left, right):
        b = budget.BUDGET.get() or budget.Budget()
        b.tick()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, first
            if len(left) + len(right) > b.max_chars:
                raise budget.TemplateLimit(f"joining two values would exceed {b.max_chars:,} characters")
            return left + right
        seq = (str, list, tuple)
        if operator == "*":
            if isinstance(left, int) and isinstance(right, seq):
                left, right = right, left
            if isinstance(left, seq) and isinstance(right, int):
                if right > 0 and b.size(left) * right > b.max_chars:
                    raise budget.TemplateLimit(f"repeating a value {right:,} times would exceed {b.max_chars:,} characters")
            elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
                raise budget.TemplateLimit("an integer over 65,536 bits")
        elif operator == "+" and isinstance(left, seq) and isinstance(right, seq):
            if b.size(left) + b.size(right) > b.max_chars:
                raise budget.TemplateLimit(f"joining two values would exceed {b.max_chars:,} characters")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(1, abs(left).bit_length()) * right > 65536:
                raise budget.TemplateLimit("an integer over 65,536 bits")
        elif operator == "%" and isinstance(left, str):
            if budget.PCT_WIDTH.search(left):
                raise budget.TemplateLimit("a format width of a million characters or more")
            budget.check_big_int(b, right if isinstance(right, tuple) else (right,), {})
            b.check_size(right, "a formatted value")
        result = self.binop_table[operator](left, right)
        if isinstance(result, (str, list, tuple)):
            b.check_size(result, "the result of an operator")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        b = budget.current()
        b.tick()
        budget.check_big_int(b, args, kwargs)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        base = getattr(target, "__self__", None)
        grows = budget.grows_to(b, getattr(target, "__name__", ""), base, args, kwargs)
        if grows is not None and grows > b.max_chars:
            raise budget.TemplateLimit(f"{getattr(target, '__name__', 'a call')}() would exceed {b.max_chars:,} characters")
        if not isinstance(__obj, jinja2.runtime.Macro):  # a macro only passes values on
            for v in (*args, *kwargs.values()):
                if isinstance(v, (list, tuple, dict)):
                    b.check_size(v, "an argument")
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            b.check_size(result, "the result of a call")
        return result

    def getattr(self, obj, attribute):
        budget.current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        budget.current().tick()
        return super().getitem(obj, argument)


def _bounded_filter(func, name: str):
    @functools.wraps(func)
    def run(*args, **kwargs):
        b = budget.current()
        b.tick()
        plain = [a for a in args if isinstance(a, (str, int, float, list, tuple, dict))]
        budget.check_big_int(b, plain, kwargs)
        for v in (*plain, *kwargs.values()):
            b.check_size(v, f"the input of |{name}")
        if plain:
            grows = budget.grows_to(b, {"center": "indent", "format": "format_filter"}.get(name, name), plain[0], plain[1:],
                              kwargs)
            if grows is not None and grows > b.max_chars:
                raise budget.TemplateLimit(f"|{name} would exceed {b.max_chars:,} characters")
        result = func(*args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            b.check_size(result, f"the result of |{name}")
        return result

    return run


@jinja2.pass_context
def _finalize(context, value):
    """Every piece of output, literal text included, passes here: counted where it is written."""
    b = budget.BUDGET.get() or budget.Budget()
    if type(value) is not str:
        b.check_size(value, "a printed value")
        value = str(value)
    b.out_chars += len(value)
    if b.out_chars > b.max_chars:
        raise budget.TemplateLimit(f"the template wrote more than {b.max_chars:,} characters: it was stopped")
    return value


class _Counted:
    """A loop's iterable: each iteration is a step (Jinja's own loop sees the same items and length)."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        b = budget.current()
        b.tick()
        for item in self.iterable:
            b.tick()
            yield item

    def __len__(self):
        return len(self.iterable)


def _concat(*parts) -> str:
    """`a ~ b`: as Jinja joins (str of each), after a size check."""
    b = budget.current()
    total = 0
    for p in parts:
        total += b.size(p)
        if total > b.max_chars:
            raise budget.TemplateLimit(f"joining with ~ would exceed {b.max_chars:,} characters")
    return "".join(map(str, parts))


# ---------------------------------------------------------------- the environment (as transformers')

class _GenerationTracker(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: the character span of the body in the top-level output
    (what transformers' AssistantTracker reports)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller):
        rv = caller()
        tracking = _TRACKING.get()
        if tracking is not None:
            start = tracking["pos"]
            tracking["spans"].append((start, start + len(rv)))
        return rv


_TRACKING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lorastudio_generation", default=None)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")


@functools.lru_cache(maxsize=1)
def environment() -> BoundedEnvironment:
    # optimized=False: no constant folding at compile time, where no budget is running
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, finalize=_finalize, optimized=False,
                             extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(f, name) for name, f in env.filters.items()}
    env.filters.update(_ls_iter=_Counted, _ls_concat=_concat, _ls_sized=_sized)  # the checks _Bounder inserts
    env.globals.pop("lipsum", None)  # n paragraphs of filler: unbounded work, no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env


def _filter(name: str, expr, *args) -> nodes.Filter:
    # our own checks are applied as filters: called directly, without the sandbox's call overhead
    return nodes.Filter(expr, name, list(args), [], None, None, lineno=expr.lineno)


def _sized(value):
    """A value about to be compared: a container's size is checked first (strings, numbers pass)."""
    if type(value) in (list, tuple, dict):
        (budget.BUDGET.get() or budget.Budget()).check_size(value, "a compared value")
    return value


class _Bounder(NodeTransformer):
    """Loops count their iterations, `~` is checked, and literal text is output through finalize
    (counted like the rest) instead of being written as a constant."""

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = _filter("_ls_iter", node.iter)
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return _filter("_ls_concat", node.nodes[0], *node.nodes[1:])

    def visit_Compare(self, node):
        # `a == b` and `x in y` compare whole values: two huge nested ones take forever, in C, where
        # no step is counted; their sizes are checked first (a call's arguments always are)
        self.generic_visit(node)
        node.expr = node.expr if isinstance(node.expr, nodes.Const) else _filter("_ls_sized", node.expr)
        for op in node.ops:
            op.expr = op.expr if isinstance(op.expr, nodes.Const) else _filter("_ls_sized", op.expr)
        return node

    def visit_Output(self, node):
        self.generic_visit(node)
        node.nodes = [nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n
                      for n in node.nodes]
        return node


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Raises jinja2.TemplateSyntaxError (with its line), or TemplateLimit."""
    if len(source) > budget.MAX_SOURCE_CHARS:
        raise budget.TemplateLimit(f"the template is {len(source):,} characters; at most {budget.MAX_SOURCE_CHARS:,}")
    env = environment()
    try:
        tree = _Bounder().visit(env.parse(source))
        tree.set_environment(env)
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError:
        raise
    except (RecursionError, MemoryError, SyntaxError, ValueError) as e:
        raise budget.TemplateLimit(f"the template could not be compiled ({type(e).__name__}: nested too deeply?)") from None


def budget_for(*values) -> budget.Budget:
    n = budget.size_of(values, 10**9)
    return budget.Budget(max_chars=budget.BASE_CHARS + 8 * n, max_steps=budget.BASE_STEPS + 10 * n,
                         deadline=time.monotonic() + budget.TIMEOUT_S)


def render(source: str, messages: list, track: bool = False, tools: list | None = None,
           **kwargs) -> tuple[str, list[tuple[int, int]]]:
    """(text, generation spans) of one conversation. Raises jinja2 errors (TemplateLimit for a
    bound) and whatever a template's own code raises (TypeError, ValueError, ...)."""
    template = compile_template(source)
    token = budget.BUDGET.set(budget_for(messages, tools, kwargs))
    tracking = {"pos": 0, "spans": []}
    tracker = _TRACKING.set(tracking if track else None)
    try:
        pieces = []
        for piece in template.generate(messages=messages, tools=tools, documents=None, **kwargs):
            pieces.append(piece)
            tracking["pos"] += len(piece)
        return "".join(pieces), tracking["spans"]
    except RecursionError:
        raise budget.TemplateLimit("the template recursed too deeply: it was stopped") from None
    except MemoryError:
        raise budget.TemplateLimit("the template ran out of memory: it was stopped") from None
    finally:
        _TRACKING.reset(tracker)
        budget.BUDGET.reset(token)
