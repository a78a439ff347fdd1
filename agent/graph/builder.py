"""Build the ask graph (a factory: nothing is compiled at import)."""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from agent.graph import nodes
from agent.graph.state import AskState, RunContext


def build_ask_graph(checkpointer: Any = None) -> Any:
    """Return the compiled graph: resolve -> plan -> access check -> fetch (records || images) -> findings
    -> reason -> citations.

    Args:
        checkpointer: a LangGraph checkpointer for threads (multi-turn state, interrupts); None
            for one-shot runs.
    """
    graph = StateGraph(AskState, context_schema=RunContext)
    # Typed as Any: LangGraph's node protocols spell `runtime` keyword-only, which the
    # traced wrappers (positional, like LangGraph calls them) do not match for mypy.
    steps: dict[str, Any] = {
        "resolve_patient": nodes.resolve_patient,
        "plan": nodes.plan,
        "access_check": nodes.access_check,
        "fetch_history": nodes.fetch,
        "image_findings": nodes.image_findings,
        "reason": nodes.reason,
        "check_citations": nodes.check_answer_citations,
    }
    for name, step in steps.items():
        graph.add_node(name, step)
    graph.add_edge(START, "resolve_patient")
    graph.add_edge("resolve_patient", "plan")
    graph.add_edge("plan", "access_check")
    graph.add_edge("access_check", "fetch_history")
    graph.add_conditional_edges("fetch_history", nodes.route_after_fetch, ["image_findings", "reason"])
    graph.add_edge("image_findings", "reason")
    graph.add_edge("reason", "check_citations")
    graph.add_edge("check_citations", END)
    return graph.compile(checkpointer=checkpointer)
