"""The transition table: every event a handler or the runner can produce is in it."""

from __future__ import annotations

import ast
import inspect

from device_agents import steps
from device_agents.machine import TRANSITIONS, Event, State
from device_agents.steps import HANDLERS


def _walk_own_body(fn_node: ast.AST):
    """Every node of a function's body, not descending into nested functions or lambdas (their returns are theirs)."""
    stack = list(ast.iter_child_nodes(fn_node))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def _returned_events(fn) -> set[Event]:
    """The ``Event.X`` values a handler's source can return (it returns only ``Event`` members or conditionals of them)."""
    tree = ast.parse(inspect.getsource(fn))
    found: set[Event] = set()
    handler = tree.body[0]
    for node in _walk_own_body(handler):
        if isinstance(node, ast.Return):
            assert node.value is not None, f"{fn.__name__} returns nothing"
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "Event":
                    found.add(Event[sub.attr])
            assert any(isinstance(s, ast.Attribute) for s in ast.walk(node.value)), f"{fn.__name__}: return of a non-Event"
    return found


def test_every_state_but_idle_has_a_handler() -> None:
    assert set(HANDLERS) == set(State) - {State.IDLE}


def test_every_event_a_handler_returns_is_in_the_table() -> None:
    for state, handler in HANDLERS.items():
        events = _returned_events(handler)
        assert events, f"{handler.__name__} returns no Event"
        for e in events:
            assert (state, e) in TRANSITIONS, f"{state} --{e}--> missing from TRANSITIONS ({handler.__name__})"


def test_every_event_the_runner_produces_is_in_the_table() -> None:
    # The runner turns a fatal error into FAILED (where the state has it; else the error is a crash) and the
    # loop guard into CRASH_LOOP in every state; RETRY only where the table allows it.
    for state in HANDLERS:
        assert (state, Event.CRASH_LOOP) in TRANSITIONS, f"no loop guard for {state}"
    for state in (State.ACCEPTING, State.DOWNLOADING, State.VERIFYING, State.PROFILING, State.ACTIVATING, State.REVERTING):
        assert (state, Event.FAILED) in TRANSITIONS
    assert (State.IDLE, Event.ASSIGNED) in TRANSITIONS and (State.IDLE, Event.LOCAL_INSTALL) in TRANSITIONS
    assert [s for (s, e), n in TRANSITIONS.items() if e is Event.RETRY] == [State.DOWNLOADING]


def test_every_failure_rolls_back_and_every_path_ends_idle() -> None:
    for (state, event), nxt in TRANSITIONS.items():
        if event is Event.FAILED:
            assert nxt is State.ROLLING_BACK
    # from every state, following the table reaches IDLE
    for start in State:
        seen, frontier = {start}, [start]
        while frontier:
            s = frontier.pop()
            for (a, _), b in TRANSITIONS.items():
                if a is s and b not in seen:
                    seen.add(b)
                    frontier.append(b)
        assert State.IDLE in seen, f"{start} cannot reach idle"
    reachable = {n for n in TRANSITIONS.values()}
    assert reachable == set(State), "a state no transition leads to"


def test_the_handlers_live_in_one_module() -> None:
    assert all(h.__module__ == steps.__name__ for h in HANDLERS.values())
