"""`slothai.compile_report()`: what torch.compile did during a block of code.

    with slothai.compile_report() as report:
        for batch in loader: ...
    print(report)   # graph breaks (reason + where), recompiles (reason), compilations, seconds

It reads Dynamo's counters and listens to its `graph_breaks` and `recompiles`
logs for the duration (torch._logging is reset to its defaults when the outermost
block exits). Blocks nest: an inner block (around an evaluation, say) reports what
happened inside it, and the outer one still sees everything, the inner block's
compilations and recompiles included.

A recompile reads as the guards that failed and the user source line the failing
guard came from (`reason`: the last frame of the user stack Dynamo logs, which runs
through every transformers frame above it); Dynamo's whole message is kept in
`full` (`report.text(full=True)` prints it).

A call of a layer `slothai.compile` compiled that ran eagerly — Dynamo broke its
graph, or compiled nothing for it — is counted under an `EAGER ...` key of
`region_calls`, with the reason, not as compiled, and is a warning (below).

Past `torch._dynamo.config.recompile_limit` variants of one function Dynamo stops
compiling it and runs every call that matches no variant eager, with one log line
the first time. The report catches that line (`recompile_limits`) and also names
each region compiled by `slothai.compile` that sits at the limit (`eager_fallbacks`),
so a hit before the block shows too; any of these makes `str(report)` open with
WARNING and the block's exit emit a RuntimeWarning.
"""
import dataclasses
import logging
import re
import time
import warnings

import torch
from torch._dynamo.utils import compilation_time_metrics, counters

from . import regions

_BREAK_LOGGERS = ("torch._dynamo.symbolic_convert.__graph_breaks", "torch._dynamo.convert_frame.__graph_breaks",
                  "torch._dynamo.exc.__graph_breaks")
_RECOMPILE_LOGGERS = ("torch._dynamo.guards.__recompiles",)
_LIMIT_LOGGERS = ("torch._dynamo.convert_frame",)  # "torch._dynamo hit config.recompile_limit (8)" warnings
# Whole-frame compile time; AOT backward compilation happens inside it.
_COMPILE_TIME_KEYS = ("_compile.compile_inner",)


def _compile_seconds():
    return sum(sum(compilation_time_metrics.get(k, ())) for k in _COMPILE_TIME_KEYS)


_ACTIVE = []  # the compile_report blocks open now, outermost first; each one's messages go to all
_HANDLERS = []  # (logger, handler, its propagate before): installed by the outermost block


class _Collect(logging.Handler):
    """Appends each message of its kind ("breaks", "recompiles", "limits") to every open report."""

    def __init__(self, kind):
        super().__init__(logging.DEBUG)
        self.kind = kind

    def emit(self, record):
        try:
            message = record.getMessage()
            for block in _ACTIVE:
                block.messages[self.kind].append(message)
        except Exception:  # noqa: BLE001  (a report must never break training)
            pass


def _listen():
    torch._logging.set_logs(graph_breaks=True, recompiles=True)
    for names, kind in ((_BREAK_LOGGERS, "breaks"), (_RECOMPILE_LOGGERS, "recompiles"), (_LIMIT_LOGGERS, "limits")):
        for name in names:
            logger = logging.getLogger(name)
            handler = _Collect(kind)
            _HANDLERS.append((logger, handler, logger.propagate))
            logger.addHandler(handler)
            if kind != "limits":  # collected here, not printed (Dynamo's own warnings still are)
                logger.propagate = False


def _stop_listening():
    while _HANDLERS:
        logger, handler, propagate = _HANDLERS.pop()
        logger.removeHandler(handler)
        logger.propagate = propagate
    torch._logging.set_logs()


def _recompile(message):
    """{"function", "reason", "guards", "where", "full"} from one of Dynamo's recompile messages:
    the guards that failed (one per compiled variant tried, without the source line Dynamo
    appends) and the last frame of the user stack it logs: the source line the failing
    guard came from."""
    m = re.search(r"Recompiling function (\S+)", message)
    guards, frames = [], []
    for line in message.splitlines():
        line = line.strip()
        g = re.match(r"- (\d+/\d+: .*)", line)
        if g and "User stack trace" not in line:
            guards.append(g.group(1).split("  #")[0].strip())
        f = re.search(r'File "([^"]+)", line (\d+), in (\S+)', line)
        if f:
            frames.append(f"{f.group(1)}:{f.group(2)} in {f.group(3)}")
    if not frames:  # Dynamo's "# file:line in fn" comment on the guard, when it logs no stack
        frames = re.findall(r"#\s*(\S+:\d+ in \S+)\s*$", message, flags=re.M)
    where = frames[-1] if frames else ""
    reason = "; ".join(guards) or message.splitlines()[-1].strip()
    return dict(function=m.group(1) if m else "?", reason=reason + (f" (at {where})" if where else ""),
                guards=guards, where=where, full=message)


@dataclasses.dataclass
class CompileReport:
    graph_breaks: list = dataclasses.field(default_factory=list)  # {"reason", "count", "where"}
    recompiles: list = dataclasses.field(default_factory=list)    # {"function", "reason", "guards", "where", "full"}
    recompile_limits: list = dataclasses.field(default_factory=list)  # {"function", "limit", "reason"}
    eager_fallbacks: list = dataclasses.field(default_factory=list)   # {"function", "variants", "limit"}
    region_calls: dict = dataclasses.field(default_factory=dict)      # slothai.compile'd layers: calls by path
    # (regions.REGION_CALLS' keys: "compiled", "eager (...)" by design, "EAGER ..." against it, with the reason)
    compilations: int = 0
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self):
        return dataclasses.asdict(self)

    def warnings(self):
        """One line per recompile limit hit or region falling back to eager (empty: none)."""
        out = [f"torch.compile hit {h['limit']} in {h['function']}: calls that match no compiled variant now run "
               f"EAGER (last reason: {h['reason']})" for h in self.recompile_limits]
        out += [f"compiled region {f['function']} has {f['variants']} variants, the recompile limit ({f['limit']}): "
                f"a call that matches none runs EAGER" for f in self.eager_fallbacks]
        out += [f"{n} call(s) of layers slothai.compile compiled ran {k}" for k, n in self.region_calls.items()
                if k.startswith("EAGER")]
        return out

    def __str__(self):
        return self.text()

    def text(self, full=False):
        """The report as `str` prints it; full=True adds Dynamo's whole message for each recompile."""
        lines = [f"WARNING: {w}" for w in self.warnings()]
        lines += [f"torch.compile report: {self.compilations} compilation(s), {self.compile_seconds:.1f} s compiling "
                 f"(of {self.wall_seconds:.1f} s), {sum(b['count'] for b in self.graph_breaks)} graph break(s), "
                 f"{len(self.recompiles)} recompile(s)"]
        for b in self.graph_breaks:
            where = f"\n      at {b['where']}" if b["where"] else ""
            lines.append(f"  graph break x{b['count']}: {b['reason']}{where}")
        for r in self.recompiles:
            lines.append(f"  recompile of {r['function']}: {r['reason']}")
            if full:
                lines += ["      " + line for line in r["full"].splitlines()]
        if self.region_calls:
            lines.append("  slothai.compile regions: " + ", ".join(f"{n} {k}" for k, n in self.region_calls.items()))
        return "\n".join(lines)


class compile_report:  # noqa: N801  (used as a context manager, named like one)
    """Context manager yielding a CompileReport filled in on exit."""

    def __enter__(self):
        self.report = CompileReport()
        self._breaks0 = dict(counters["graph_break"])
        self._graphs0 = counters["stats"]["unique_graphs"]
        self._secs0 = _compile_seconds()
        self.messages = {"breaks": [], "recompiles": [], "limits": []}
        self._calls0 = dict(regions.REGION_CALLS)
        if not _ACTIVE:
            _listen()
        _ACTIVE.append(self)
        self._t0 = time.perf_counter()
        return self.report

    def __exit__(self, *exc):
        r = self.report
        r.wall_seconds = time.perf_counter() - self._t0
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _stop_listening()
        r.compilations = counters["stats"]["unique_graphs"] - self._graphs0
        r.compile_seconds = _compile_seconds() - self._secs0
        for reason, n in counters["graph_break"].items():
            d = n - self._breaks0.get(reason, 0)
            if d > 0:
                r.graph_breaks.append(dict(reason=reason.split("\n")[0].strip(), count=d,
                                           where=_where(reason, self.messages["breaks"])))
        r.recompiles = [_recompile(msg) for msg in self.messages["recompiles"]]
        for msg in self.messages["limits"]:
            m = re.search(r"hit config\.(\w+) \((\d+)\)", msg)
            if m:
                fn = re.search(r"function: (.+)", msg)
                why = re.search(r"last reason: (.+)", msg)
                r.recompile_limits.append(dict(function=fn.group(1).strip() if fn else "?",
                                               limit=f"{m.group(1)} ({m.group(2)})",
                                               reason=why.group(1).strip() if why else "?"))
        r.eager_fallbacks = regions.regions_at_recompile_limit()
        r.region_calls = {k: n - self._calls0.get(k, 0) for k, n in regions.REGION_CALLS.items()
                          if n - self._calls0.get(k, 0) > 0}
        if r.warnings():
            warnings.warn("slothai.compile_report: " + "; ".join(r.warnings()), RuntimeWarning, stacklevel=2)
        return False


def _where(reason, messages):
    """The last user source line logged with this graph break (or with any, if none matches)."""
    head = reason.split("\n")[0].strip()[:40]
    matching = [m for m in messages if head in m] or messages
    for msg in matching:
        files = re.findall(r'File "([^"]+)", line (\d+)', msg)
        if files:
            return f"{files[-1][0]}:{files[-1][1]}"
    return ""
