"""The transition tables of both NBD cores, walked: every (state, input) pair a table does not
hold is refused with the right error (the peer's input: RemoteProtocolError, and the connection
is poisoned; a call of our own I/O layer: LocalProtocolError, and nothing changes); the
documented flows (plain, STARTTLS allowed and required, EXPORT_NAME, GO, INFO, LIST, ABORT, DISC,
hang-ups) run through the real cores using only pairs in the tables, and together use every
pair the tables hold; the parse and option tables cover every state and option."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from itertools import product
from typing import Any

import pytest

from blocktrail.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    Command,
    Disconnect,
    ExportChosen,
    ExportInfo,
    LocalProtocolError,
    NegotiationRefused,
    Ready,
    RemoteProtocolError,
    Request,
    ServerConnection,
    StartTls,
    TlsMode,
    TlsNotOffered,
)
from blocktrail.nbd.proto import client as client_core
from blocktrail.nbd.proto import server as server_core
from blocktrail.nbd.proto.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)
from blocktrail.nbd.proto.machine import StateMachine

SS, SI = server_core.State, server_core.Input
CS, CI = client_core.State, client_core.Input
EXPORT = ExportInfo("d", 1 << 20, False, contexts=("base:allocation",))


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORT if name == "d" else None

    def names(self) -> list[str]:
        return ["d"]


@dataclass(frozen=True)
class Role:
    table: Mapping[Any, Mapping[Any, Any]]
    local: frozenset[Any]
    refusals: Mapping[Any, str]
    states: type[Enum]
    inputs: type[Enum]
    initial: Enum
    closed: Enum
    violation: Enum

    def machine(self, state: Enum) -> StateMachine[Any, Any]:
        return StateMachine(self.table, state, local=self.local, violation=self.violation,
                            refusals=self.refusals)


ROLES = {
    "server": Role(server_core.TRANSITIONS, server_core.LOCAL_INPUTS, server_core.REFUSALS,
                   SS, SI, SS.CLIENT_FLAGS, SS.CLOSED, SI.VIOLATION),
    "client": Role(client_core.TRANSITIONS, client_core.LOCAL_INPUTS, client_core.REFUSALS,
                   CS, CI, CS.GREETING, CS.CLOSED, CI.VIOLATION),
}


# ---------------------------------------------------------------------- the tables themselves


@pytest.mark.parametrize("role", ROLES)
def test_every_pair_not_in_the_table_is_refused_with_the_right_error(role: str) -> None:
    r = ROLES[role]
    for state, event in product(r.states, r.inputs):
        machine = r.machine(state)
        if event in r.table[state]:
            assert machine.fire(event) is r.table[state][event]
            continue
        if event in r.local:
            with pytest.raises(LocalProtocolError):
                machine.fire(event)
            assert machine.state is state, (state, event)  # our mistake changed nothing
        else:
            with pytest.raises(RemoteProtocolError):
                machine.fire(event)
            assert machine.state is r.closed, (state, event)  # the peer's: poisoned
            assert not machine.allows(event)


@pytest.mark.parametrize("role", ROLES)
def test_the_tables_are_whole(role: str) -> None:
    r = ROLES[role]
    assert set(r.table) == set(r.states)
    for state in r.states:
        assert r.table[state][r.violation] is r.closed  # any state can end
    assert set(r.table[r.closed].values()) == {r.closed}  # and stays ended
    reachable, todo = {r.initial}, [r.initial]
    while todo:
        for nxt in r.table[todo.pop()].values():
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert reachable == set(r.states)
    used = {e for moves in r.table.values() for e in moves}
    assert used == set(r.inputs)  # no input that nothing accepts
    assert r.local < set(r.inputs)
    for key in r.refusals:  # a message for a refusal is for a pair that is refused
        state, event = key if isinstance(key, tuple) else (None, key)
        assert state is None or event not in r.table[state]


def test_parsers_cover_every_state() -> None:
    assert set(server_core.PARSERS) == set(SS)
    assert set(client_core.PARSERS) == set(CS)


def test_every_option_has_a_handler() -> None:
    assert set(server_core.OPTION_HANDLERS) == set(Option)
    before_tls = server_core.OPTIONS_BEFORE_TLS
    assert before_tls == {Option.STARTTLS, Option.ABORT}


def test_every_reply_to_what_the_client_asks_has_a_handler() -> None:
    kinds = client_core.ReplyKind
    sent = {Option.STARTTLS, Option.STRUCTURED_REPLY, Option.SET_META_CONTEXT, Option.GO}
    for option in sent:  # an end: acknowledged, refused, or TLS wanted
        for kind in (kinds.ACK, kinds.ERROR, kinds.TLS_REQUIRED):
            assert (option, kind) in client_core.REPLY_HANDLERS, (option, kind)
    assert {o for o, _ in client_core.REPLY_HANDLERS} == sent
    assert [kinds.of(k) for k in (OptionReply.ACK, OptionReply.SERVER, OptionReply.INFO,
                                  OptionReply.META_CONTEXT, OptionReply.ERR_UNSUP,
                                  OptionReply.ERR_TLS_REQD, 2**31 + 99)] == [
        kinds.ACK, kinds.OTHER, kinds.INFO, kinds.META_CONTEXT, kinds.ERROR,
        kinds.TLS_REQUIRED, kinds.ERROR]


# ---------------------------------------------------------------------- the documented flows

Fired = list[tuple[Enum, Enum, Enum]]  # (state, input, next state)


class Recording(StateMachine[Enum, Enum]):
    """A connection's table that notes every input it is fired with."""

    fired: Fired

    def fire(self, event: Enum) -> Enum:
        before = self.state
        after = super().fire(event)
        self.fired.append((before, event, after))
        return after


def record(conn: ServerConnection | ClientConnection, fired: Fired | None = None) -> Fired:
    """Every input the connection's table is fired with from now on (into ``fired``)."""
    core = server_core if isinstance(conn, ServerConnection) else client_core
    machine = Recording(core.TRANSITIONS, conn.state,
                        local=core.LOCAL_INPUTS, violation=core.Input.VIOLATION,
                        refusals=core.REFUSALS)
    machine.fired = [] if fired is None else fired
    conn._machine = machine
    return machine.fired


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def name_and_infos(name: bytes = b"d") -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE)


def meta(opt: int) -> bytes:
    query = b"base:allocation"
    return option(opt, struct.pack(">I", 1) + b"d" + struct.pack(">II", 1, len(query)) + query)


def request(command: Command, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, 0, 4096 if command in (
        Command.READ, Command.BLOCK_STATUS) else 0)


FLAGS = struct.pack(">I", 3)


@dataclass(frozen=True)
class Scenario:
    """Bytes a client sends, a chunk per receive_data, to a server core in ``tls`` mode."""

    data: list[bytes]
    tls: TlsMode = TlsMode.OFF
    answer: bool = True  # answer the requests
    handshake: bool = True  # the TLS handshake works (else: the client goes away during it)


def serve(scenario: Scenario, fired: Fired | None = None
          ) -> tuple[ServerConnection, Fired, list[object]]:
    """Run ``scenario``: answer requests (unless told not to), and at StartTls pretend the
    handshake worked (or that the client went away during it). Errors propagate; ``fired``
    holds what ran before."""
    conn = ServerConnection(Catalog(), scenario.tls)
    fired = record(conn, fired)
    events: list[object] = []
    for chunk in scenario.data:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, StartTls) and not scenario.handshake:
                conn.receive_data(b"")
                return conn, fired, events
            if isinstance(event, StartTls):
                conn.tls_established()
            elif isinstance(event, Request) and scenario.answer:
                conn.reply_error(event.cookie, 22, "no")
            elif isinstance(event, Disconnect):
                if conn.can_reply and not scenario.answer:
                    conn.reply_simple(5)  # the request in flight
                break
    return conn, fired, events


def _inputs(fired: Fired, receive: Enum) -> list[Enum]:
    return [e for _, e, _ in fired if e is not receive]


NEGOTIATE_GO = option(Option.GO, name_and_infos())
SERVER_FLOWS: dict[str, tuple[Scenario, list[Enum]]] = {  # receive_data(bytes) left out
    "plain GO": (Scenario([FLAGS + option(Option.STRUCTURED_REPLY)
                           + meta(Option.SET_META_CONTEXT) + NEGOTIATE_GO,
                           request(Command.READ) + request(Command.DISC)]),
                 [SI.FLAGS, SI.OPTION, SI.OPTION, SI.EXPORT_CHOSEN, SI.REQUEST, SI.REPLY,
                  SI.DISC]),
    "EXPORT_NAME, then the client hangs up": (
        Scenario([FLAGS + option(Option.EXPORT_NAME, b"d") + request(Command.FLUSH), b""]),
        [SI.FLAGS, SI.EXPORT_CHOSEN, SI.REQUEST, SI.REPLY, SI.EOF, SI.HANGUP]),
    "INFO, LIST, LIST_META_CONTEXT, an unknown option, then GO": (
        Scenario([FLAGS + option(Option.INFO, name_and_infos()) + option(Option.LIST)
                  + meta(Option.LIST_META_CONTEXT) + option(99) + NEGOTIATE_GO]),
        [SI.FLAGS, SI.OPTION, SI.OPTION, SI.OPTION, SI.OPTION, SI.EXPORT_CHOSEN]),
    "ABORT": (Scenario([FLAGS + option(Option.LIST) + option(Option.ABORT)]),
              [SI.FLAGS, SI.OPTION, SI.ABORT]),
    "STARTTLS when TLS is off": (Scenario([FLAGS + option(Option.STARTTLS) + NEGOTIATE_GO]),
                                 [SI.FLAGS, SI.OPTION, SI.EXPORT_CHOSEN]),
    "STARTTLS allowed": (Scenario([FLAGS + option(Option.STARTTLS), NEGOTIATE_GO],
                                  TlsMode.ALLOW),
                         [SI.FLAGS, SI.STARTTLS, SI.TLS_ESTABLISHED, SI.EXPORT_CHOSEN]),
    "STARTTLS required": (Scenario([FLAGS + NEGOTIATE_GO + option(Option.STARTTLS),
                                    option(Option.STRUCTURED_REPLY) + NEGOTIATE_GO
                                    + request(Command.DISC)], TlsMode.REQUIRE),
                          [SI.FLAGS, SI.OPTION, SI.STARTTLS, SI.TLS_ESTABLISHED, SI.OPTION,
                           SI.EXPORT_CHOSEN, SI.DISC]),
    "ABORT before TLS": (Scenario([FLAGS + option(Option.ABORT)], TlsMode.REQUIRE),
                         [SI.FLAGS, SI.ABORT]),
    "gone during the TLS handshake": (
        Scenario([FLAGS + option(Option.STARTTLS)], TlsMode.REQUIRE, handshake=False),
        [SI.FLAGS, SI.STARTTLS, SI.EOF]),
    "DISC with a request in flight": (
        Scenario([FLAGS + NEGOTIATE_GO + request(Command.FLUSH, 5) + request(Command.DISC)],
                 answer=False), [SI.FLAGS, SI.EXPORT_CHOSEN, SI.REQUEST, SI.DISC, SI.REPLY]),
}


@pytest.mark.parametrize("flow", SERVER_FLOWS)
def test_server_flows_use_only_pairs_in_the_table(flow: str) -> None:
    scenario, expected = SERVER_FLOWS[flow]
    _, fired, events = serve(scenario)
    assert _inputs(fired, SI.RECEIVE) == expected
    assert all(n is server_core.TRANSITIONS[s][e] for s, e, n in fired)
    assert not any(isinstance(e, Disconnect) for e in events[:-1])


def test_server_answers_requests_in_flight_after_disc_and_reads_nothing_more() -> None:
    conn, fired, events = serve(SERVER_FLOWS["DISC with a request in flight"][0])
    assert isinstance(events[-1], Disconnect) and conn.state is SS.DISCONNECTED
    conn.reply_simple(5)  # the FLUSH still in flight is answered
    assert fired[-1] == (SS.DISCONNECTED, SI.REPLY, SS.DISCONNECTED) and conn.can_reply
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")  # nothing more is read
    assert conn.next_event() == Disconnect()


SERVER_VIOLATIONS: dict[str, Scenario] = {
    "gone in the middle of the flags": Scenario([FLAGS[:2], b""]),
    "gone before the flags": Scenario([b""]),
    "gone between options": Scenario([FLAGS + option(Option.STRUCTURED_REPLY), b""]),
    "gone in the middle of an option": Scenario([FLAGS + option(Option.EXPORT_NAME, b"d")[:10],
                                                 b""]),
    "gone in the middle of a request": Scenario([FLAGS + NEGOTIATE_GO,
                                                 request(Command.READ)[:7], b""]),
    "EXPORT_NAME before TLS, which cannot be refused": Scenario(
        [FLAGS + option(Option.EXPORT_NAME, b"d")], TlsMode.REQUIRE),
    "plaintext behind STARTTLS": Scenario([FLAGS + option(Option.STARTTLS) + b"x"],
                                          TlsMode.ALLOW),
    "bad client flags": Scenario([struct.pack(">I", 0)]),
    "bad request magic": Scenario([FLAGS + NEGOTIATE_GO + b"\0" * 28]),
}


@pytest.mark.parametrize("violation", SERVER_VIOLATIONS)
def test_server_violations_poison_the_connection(violation: str) -> None:
    scenario = SERVER_VIOLATIONS[violation]
    conn = ServerConnection(Catalog(), scenario.tls)
    with pytest.raises(RemoteProtocolError):
        for chunk in scenario.data:
            conn.receive_data(chunk)
            while conn.next_event() is not NEED_DATA:
                pass
    assert conn.state is SS.CLOSED
    assert conn.next_event() == Disconnect() and not conn.can_reply
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")


def test_every_server_pair_is_used_by_the_flows_and_violations() -> None:
    used: set[tuple[Enum, Enum]] = set()
    for scenario in [*(s for s, _ in SERVER_FLOWS.values()), *SERVER_VIOLATIONS.values()]:
        fired: Fired = []
        with contextlib.suppress(RemoteProtocolError):
            serve(scenario, fired)
        used |= {(s, e) for s, e, _ in fired}
    table = {(s, e) for s, moves in server_core.TRANSITIONS.items() for e in moves}
    # VIOLATION is not fired but taken by poison() (the test above, and the walk of the table)
    assert table - used - {(s, SI.VIOLATION) for s in SS} == set()


# calls of the I/O layer, and the input each one is
SERVER_CALLS: dict[Enum, Callable[[ServerConnection], object]] = {
    SI.RECEIVE: lambda c: c.receive_data(b"x"),
    SI.EOF: lambda c: c.receive_data(b""),
    SI.TLS_ESTABLISHED: lambda c: c.tls_established(),
    SI.REPLY: lambda c: c.reply_simple(1),
}


def server_in(state: Enum) -> ServerConnection:
    """A server core driven into ``state`` by real bytes."""
    conn = ServerConnection(Catalog(), TlsMode.ALLOW)
    feed = {SS.CLIENT_FLAGS: b"", SS.OPTIONS: FLAGS, SS.TLS_HANDSHAKE: FLAGS
            + option(Option.STARTTLS), SS.TRANSMISSION: FLAGS + option(Option.EXPORT_NAME, b"d"),
            SS.DISCONNECTED: FLAGS + option(Option.EXPORT_NAME, b"d") + request(Command.DISC),
            SS.CLOSED: FLAGS + option(Option.ABORT)}[state]
    if feed:
        conn.receive_data(feed)
        while conn.state is not state and conn.next_event() is not NEED_DATA:
            pass
    assert conn.state is state
    return conn


@pytest.mark.parametrize(("state", "event"), list(product(SS, SERVER_CALLS)))
def test_server_calls_of_the_io_layer_follow_the_table(state: Enum, event: Enum) -> None:
    conn = server_in(state)
    allowed = server_core.TRANSITIONS[state].get(event)
    if allowed is None:
        with pytest.raises(LocalProtocolError):
            SERVER_CALLS[event](conn)
        assert conn.state is state  # refused before it did anything
    else:
        SERVER_CALLS[event](conn)
        assert conn.state is allowed


# ---------------------------------------------------------------------- the client's flows

GREETING = struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                       HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)


def reply(opt: int, kind: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, kind, len(data)) + data


GO_OK = (reply(Option.GO, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, 1 << 20, 1))
         + reply(Option.GO, OptionReply.ACK))
STRUCTURED_OK = reply(Option.STRUCTURED_REPLY, OptionReply.ACK)
CONTEXT_OK = (reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                    struct.pack(">I", 1) + b"base:allocation")
              + reply(Option.SET_META_CONTEXT, OptionReply.ACK))


@dataclass(frozen=True)
class ClientScenario:
    """What a server sends, a chunk per receive_data, to a client core asking ``contexts``."""

    data: list[bytes]
    tls: TlsMode = TlsMode.OFF
    contexts: list[str] | None = None
    handshake: bool = True  # the TLS handshake works (else: the server goes away during it)


def drive_client(scenario: ClientScenario, fired: Fired | None = None
                 ) -> tuple[ClientConnection, Fired, list[object]]:
    """Run ``scenario``: at StartTls pretend the handshake worked (or that the server went away
    during it), at Ready send a FLUSH. Errors propagate; ``fired`` holds what ran before."""
    conn = ClientConnection("d", scenario.contexts, scenario.tls)
    fired = record(conn, fired)
    events: list[object] = []
    for chunk in scenario.data:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, StartTls) and not scenario.handshake:
                conn.receive_data(b"")
                return conn, fired, events
            if isinstance(event, StartTls):
                conn.tls_established()
            elif isinstance(event, Ready):
                conn.send_request(Command.FLUSH)
            elif isinstance(event, Disconnect):
                break
    return conn, fired, events


NONE_CHUNK = struct.pack(">IHHQI", 0x668E33EF, 1, 0, 1, 0)  # FLUSH (cookie 1) answered
CLIENT_FLOWS: dict[str, tuple[ClientScenario, list[Enum]]] = {  # receive_data(bytes) left out
    "plain, then the server hangs up": (
        ClientScenario([GREETING, STRUCTURED_OK + CONTEXT_OK + GO_OK, NONE_CHUNK, b"", b""],
                       contexts=["base:allocation"]),
        [CI.GREETING, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.OPTION_REPLY,
         CI.READY, CI.SEND_REQUEST, CI.EOF, CI.HANGUP, CI.EOF]),
    "STARTTLS required": (
        ClientScenario([GREETING + reply(Option.STARTTLS, OptionReply.ACK),
                        STRUCTURED_OK + GO_OK], TlsMode.REQUIRE),
        [CI.GREETING, CI.STARTTLS_ACK, CI.TLS_ESTABLISHED, CI.OPTION_REPLY, CI.OPTION_REPLY,
         CI.READY, CI.SEND_REQUEST]),
    "STARTTLS refused, plaintext allowed": (
        ClientScenario([GREETING + reply(Option.STARTTLS, OptionReply.ERR_UNSUP)
                        + STRUCTURED_OK + GO_OK], TlsMode.ALLOW),
        [CI.GREETING, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.READY,
         CI.SEND_REQUEST]),
    "structured replies and contexts refused": (
        ClientScenario([GREETING + reply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP)
                        + reply(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID) + GO_OK],
                       contexts=["base:allocation"]),
        [CI.GREETING, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.OPTION_REPLY, CI.READY,
         CI.SEND_REQUEST]),
    "the server goes away during the TLS handshake": (
        ClientScenario([GREETING + reply(Option.STARTTLS, OptionReply.ACK)], TlsMode.REQUIRE,
                       handshake=False),
        [CI.GREETING, CI.STARTTLS_ACK, CI.EOF]),
}


@pytest.mark.parametrize("flow", CLIENT_FLOWS)
def test_client_flows_use_only_pairs_in_the_table(flow: str) -> None:
    scenario, expected = CLIENT_FLOWS[flow]
    _, fired, _ = drive_client(scenario)
    assert _inputs(fired, CI.RECEIVE) == expected
    assert all(n is client_core.TRANSITIONS[s][e] for s, e, n in fired)


CLIENT_REFUSALS: dict[str, tuple[ClientScenario, type[Exception]]] = {
    "the export": (ClientScenario([GREETING + STRUCTURED_OK
                                   + reply(Option.GO, OptionReply.ERR_UNKNOWN, b"no"), b""]),
                   NegotiationRefused),
    "STARTTLS, required": (ClientScenario([GREETING + reply(Option.STARTTLS,
                                                            OptionReply.ERR_POLICY)],
                                          TlsMode.REQUIRE), TlsNotOffered),
}


@pytest.mark.parametrize("refusal", CLIENT_REFUSALS)
def test_client_refusals_close_the_connection(refusal: str) -> None:
    scenario, error = CLIENT_REFUSALS[refusal]
    fired: Fired = []
    with pytest.raises(error):
        drive_client(scenario, fired)
    assert fired[-1] == (CS.OPTIONS, CI.REFUSED, CS.CLOSED)


CLIENT_VIOLATIONS: dict[str, ClientScenario] = {
    "gone in the greeting": ClientScenario([GREETING[:5], b""]),
    "gone before the greeting": ClientScenario([b""]),
    "gone mid-negotiation": ClientScenario([GREETING + STRUCTURED_OK, b""]),
    "a reply to what was not asked": ClientScenario([GREETING
                                                     + reply(Option.GO, OptionReply.ACK)]),
    "GO without the export's size": ClientScenario([GREETING + STRUCTURED_OK
                                                    + reply(Option.GO, OptionReply.ACK)]),
    "an odd reply to STARTTLS": ClientScenario([GREETING + reply(Option.STARTTLS,
                                                                 OptionReply.SERVER)],
                                               TlsMode.ALLOW),
    "a reply for a cookie not in flight": ClientScenario(
        [GREETING + STRUCTURED_OK + GO_OK + NONE_CHUNK.replace(b"\0\0\0\x01", b"\0" * 4)]),
}


@pytest.mark.parametrize("violation", CLIENT_VIOLATIONS)
def test_client_violations_poison_the_connection(violation: str) -> None:
    scenario = CLIENT_VIOLATIONS[violation]
    conn = ClientConnection("d", scenario.contexts, scenario.tls)
    with pytest.raises(RemoteProtocolError):
        for chunk in scenario.data:
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, Ready):
                    conn.send_request(Command.FLUSH)
    assert conn.state is CS.CLOSED and conn.next_event() == Disconnect()
    with pytest.raises(LocalProtocolError):
        conn.send_request(Command.FLUSH)


def test_every_client_pair_is_used_by_the_flows_refusals_and_violations() -> None:
    used: set[tuple[Enum, Enum]] = set()
    scenarios = [*(s for s, _ in CLIENT_FLOWS.values()),
                 *(s for s, _ in CLIENT_REFUSALS.values()), *CLIENT_VIOLATIONS.values()]
    for scenario in scenarios:
        fired: Fired = []
        with contextlib.suppress(RemoteProtocolError, NegotiationRefused, TlsNotOffered):
            drive_client(scenario, fired)
        used |= {(s, e) for s, e, _ in fired}
    table = {(s, e) for s, moves in client_core.TRANSITIONS.items() for e in moves}
    assert table - used - {(s, CI.VIOLATION) for s in CS} == set()


CLIENT_CALLS: dict[Enum, Callable[[ClientConnection], object]] = {
    CI.RECEIVE: lambda c: c.receive_data(b"x"),
    CI.EOF: lambda c: c.receive_data(b""),
    CI.TLS_ESTABLISHED: lambda c: c.tls_established(),
    CI.SEND_REQUEST: lambda c: c.send_request(Command.FLUSH),
}


def client_in(state: Enum) -> ClientConnection:
    conn = ClientConnection("d", None, TlsMode.ALLOW)
    feed = {CS.GREETING: [], CS.OPTIONS: [GREETING],
            CS.TLS_HANDSHAKE: [GREETING + reply(Option.STARTTLS, OptionReply.ACK)],
            CS.TRANSMISSION: [GREETING + reply(Option.STARTTLS, OptionReply.ERR_UNSUP)
                              + STRUCTURED_OK + GO_OK],
            CS.CLOSED: [GREETING + reply(Option.STARTTLS, OptionReply.ERR_UNSUP) + STRUCTURED_OK
                        + GO_OK, b""]}[state]
    for chunk in feed:
        conn.receive_data(chunk)
        while conn.state is not CS.TLS_HANDSHAKE and not isinstance(
                event := conn.next_event(), Disconnect) and event is not NEED_DATA:
            pass
    assert conn.state is state
    return conn


@pytest.mark.parametrize(("state", "event"), list(product(CS, CLIENT_CALLS)))
def test_client_calls_of_the_io_layer_follow_the_table(state: Enum, event: Enum) -> None:
    conn = client_in(state)
    allowed = client_core.TRANSITIONS[state].get(event)
    if allowed is None:
        with pytest.raises(LocalProtocolError):
            CLIENT_CALLS[event](conn)
        assert conn.state is state
    else:
        CLIENT_CALLS[event](conn)
        assert conn.state is allowed


def test_export_chosen_carries_what_was_negotiated() -> None:
    _, _, events = serve(Scenario([FLAGS + option(Option.STRUCTURED_REPLY)
                                   + meta(Option.SET_META_CONTEXT) + NEGOTIATE_GO]))
    assert events == [ExportChosen(EXPORT, True, {1: "base:allocation"})]
