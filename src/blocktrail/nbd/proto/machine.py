"""A connection's state as a transition table (h11's `_state.py` way), for both NBD cores.

The table maps (state, input) to the next state; every change of state goes through `fire`. An
input is either something the peer sent (a protocol input) or a call of our own I/O layer (a
local input). A pair the table does not hold is refused:

- a peer's input: `RemoteProtocolError`, and the connection is poisoned first (the table's
  ``violation`` input, which every state has, leads to the closed state);
- a local input: `LocalProtocolError`, and nothing changes (the call was refused before it did
  anything, so the connection is as it was; the caller has a bug to fix).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from enum import Enum
from typing import Generic, TypeVar

from blocktrail.nbd.proto.errors import LocalProtocolError, RemoteProtocolError


class MachineEnum(Enum):
    """The base of a table's states and inputs: its members hash by identity, one C call
    (Enum's own ``__hash__`` is Python code, and every request looks the table up a few
    times). Their equality is identity already."""

    __hash__ = object.__hash__


StateT = TypeVar("StateT", bound=Enum)
InputT = TypeVar("InputT", bound=Enum)

Table = Mapping[StateT, Mapping[InputT, StateT]]


class StateMachine(Generic[StateT, InputT]):
    """The state of one connection. ``refusals`` hold the messages for refused pairs, keyed by
    (state, input) or by input alone; ``{state}`` in them is replaced by the state's name."""

    __slots__ = ("_local", "_refusals", "_table", "_violation", "state")

    def __init__(self, table: Table[StateT, InputT], initial: StateT, *,
                 local: AbstractSet[InputT], violation: InputT,
                 refusals: Mapping[InputT | tuple[StateT, InputT], str]) -> None:
        self._table = table
        self._local = local
        self._violation = violation
        self._refusals = refusals
        self.state = initial

    def fire(self, event: InputT) -> StateT:
        """Move on by ``event``; -> the new state. Refused as the module docstring says."""
        state = self._table[self.state].get(event)
        if state is None:
            raise self.refusal(event)
        self.state = state
        return state

    def allows(self, event: InputT) -> bool:
        return event in self._table[self.state]

    def poison(self) -> None:
        """The peer broke the protocol: the connection is over."""
        self.state = self._table[self.state][self._violation]

    def refusal(self, event: InputT) -> LocalProtocolError | RemoteProtocolError:
        """The error for ``event`` in this state (a peer's input poisons the connection)."""
        state = self.state
        template = self._refusals.get((state, event)) or self._refusals.get(event) or (
            f"{event.name} is not allowed in state {{state}}")
        message = template.replace("{state}", state.name)
        if event in self._local:
            return LocalProtocolError(message)
        self.poison()
        return RemoteProtocolError(message)
