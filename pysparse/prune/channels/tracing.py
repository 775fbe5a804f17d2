"""torch.fx tracing for the channel graph: every node knows the module it runs in, and a submodule that cannot be
traced becomes an opaque leaf (its channels are kept) instead of failing the whole model."""
from __future__ import annotations

from torch import fx, nn

__all__ = ["TraceFailure", "trace_model"]

MODULE_PATH = "pysparse_module"  # node.meta key: qualified name of the module the node was traced in


class TraceFailure(RuntimeError):
    """The model could not be traced at all (reported; the model is left as it is)."""


class _ModulePathTracer(fx.Tracer):
    """fx tracer that records the module path of every node and can keep chosen submodules opaque."""

    def __init__(self, extra_leaves=()):
        super().__init__()
        self.extra_leaves = set(extra_leaves)
        self.stack = [""]
        self.failed_at: str | None = None

    def is_leaf_module(self, m, qualname):
        return qualname in self.extra_leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qual = self.path_of_module(m)
        self.stack.append(qual)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None and not self.is_leaf_module(m, qual):
                self.failed_at = qual
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta[MODULE_PATH] = self.stack[-1]
        return node


def trace_model(model: nn.Module, notes: list[str], max_retries: int = 30) -> fx.GraphModule:
    """Symbolic trace; a submodule that cannot be traced becomes an opaque leaf (noted in ``notes``)."""
    leaves: set[str] = set()
    for _ in range(max_retries):
        tracer = _ModulePathTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # any trace error: fall back to a leaf, or give up
            where = tracer.failed_at
            if not where or where in leaves:
                raise TraceFailure(f"torch.fx could not trace the model: {type(exc).__name__}: {exc}") from exc
            leaves.add(where)
            notes.append(f"{where}: not traceable by torch.fx ({type(exc).__name__}: {str(exc)[:120]}); "
                         "kept as an opaque block, its channels are not pruned")
            continue
        return fx.GraphModule(tracer.root, graph)
    raise TraceFailure(f"torch.fx could not trace the model after making {len(leaves)} submodules opaque")
