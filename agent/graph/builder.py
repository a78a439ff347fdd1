"""Build the ask graph (a factory: nothing is compiled at import)."""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph

from agent.graph import nodes
from agent.graph.state import AskState, RunContext


def build_ask_graph() -> Any:
    """Return the compiled graph: resolve -> history -> (images -> findings) -> reason -> citations."""
    graph = StateGraph(AskState, context_schema=RunContext)
    graph.add_node("resolve_patient", nodes.resolve_patient)
    graph.add_node("fetch_history", nodes.fetch_history)
    graph.add_node("fetch_images", nodes.fetch_images)
    graph.add_node("image_findings", nodes.image_findings)
    graph.add_node("reason", nodes.reason)
    graph.add_node("check_citations", nodes.check_answer_citations)
    graph.add_edge(START, "resolve_patient")
    graph.add_edge("resolve_patient", "fetch_history")
    graph.add_conditional_edges("fetch_history", nodes.route_after_history, ["fetch_images", "reason"])
    graph.add_conditional_edges("fetch_images", nodes.route_after_images, ["image_findings", "reason"])
    graph.add_edge("image_findings", "reason")
    graph.add_edge("reason", "check_citations")
    graph.add_edge("check_citations", END)
    return graph.compile()
