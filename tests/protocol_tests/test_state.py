"""The connection state machine: its table, closing, errors, roles and configuration."""

from __future__ import annotations

import itertools

import pytest

from vfmig.protocol import (
    Config,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Credit,
    DataChunk,
    Encoding,
    ErrorCode,
    Goodbye,
    HandshakeCompleted,
    LocalProtocolError,
    Notification,
    Ping,
    Pong,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Role,
)
from vfmig.protocol._state import TRANSITIONS, Input, StateMachine

ORCH, AGENT, SENDER, RECEIVER = (
    Role.ORCHESTRATOR,
    Role.AGENT,
    Role.DATA_SENDER,
    Role.DATA_RECEIVER,
)


def _machine(state: ConnectionState) -> StateMachine:
    machine = StateMachine()
    machine.state = state
    return machine


@pytest.mark.parametrize(("state", "event"), list(itertools.product(ConnectionState, Input)))
def test_only_listed_transitions_happen(state, event):
    machine = _machine(state)
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(LocalProtocolError) as info:
            machine.process(event)
        assert info.value.code is ErrorCode.BAD_STATE
        assert machine.state is state  # a refused input changes nothing
    else:
        machine.process(event)
        assert machine.state is expected


def test_error_is_absorbing_and_once_only_inputs_happen_once():
    for event in Input:
        assert (ConnectionState.ERROR, event) not in TRANSITIONS
    machine = _machine(ConnectionState.ESTABLISHED)
    machine.process(Input.GOODBYE_SENT)
    with pytest.raises(LocalProtocolError):
        machine.process(Input.GOODBYE_SENT)
    assert machine.state is ConnectionState.CLOSING
    machine.process(Input.GOODBYE_RECEIVED)
    machine.process(Input.TRANSPORT_ENDED)
    with pytest.raises(LocalProtocolError):
        machine.process(Input.TRANSPORT_ENDED)
    assert machine.state is ConnectionState.CLOSED


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError("x", code=ErrorCode.LIMIT)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)


# --- after an error ------------------------------------------------------------------------


def test_after_a_remote_error_every_call_is_refused(pair):
    p = pair(ORCH)
    o = p.conn[ORCH]
    with pytest.raises(RemoteProtocolError):
        o.receive_data(b"XX" + bytes(20))
    assert o.state is ConnectionState.ERROR
    goodbye = o.data_to_send()
    assert b"bad_magic" in goodbye  # the peer is told why
    assert o.data_to_send() == b""
    for call in (
        lambda: o.send(Ping()),
        lambda: o.receive_data(b"x"),
        lambda: o.receive_data(b""),
        lambda: o.tick(1.0),
        lambda: o.send_data(1, 0, 0, 1, Encoding.RAW, b"x"),
    ):
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert info.value.code is ErrorCode.BAD_STATE
        assert "bad_magic" in str(info.value) or "not a vfmig peer" in str(info.value)
    assert o.statistics().state is ConnectionState.ERROR


def test_a_local_error_enters_error_without_telling_the_peer(pair):
    p = pair(ORCH)
    o = p.conn[ORCH]
    with pytest.raises(LocalProtocolError):
        o.send(Response(id=1, result=None))  # an orchestrator does not answer
    assert o.state is ConnectionState.ERROR
    assert o.data_to_send() == b""


def test_send_failed(pair):
    p = pair(ORCH)
    o = p.conn[ORCH]
    o.send_failed()
    assert o.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError):
        o.send(Ping())
    o.send_failed()  # idempotent
    assert o.state is ConnectionState.ERROR


# --- closing -------------------------------------------------------------------------------


def test_goodbye_closes_in_both_orders(pair):
    p = pair(ORCH)
    o, a = p.conn[ORCH], p.conn[AGENT]
    in_flight = o.send(Request(id=1, method="status", params={}))
    p.send(AGENT, Goodbye(reason="shutting down"), expect=[Goodbye(reason="shutting down")])
    assert a.state is o.state is ConnectionState.CLOSING
    # what the orchestrator sent before it saw the Goodbye still arrives
    assert a.receive_data(in_flight) == [Request(id=1, method="status", params={})]
    with pytest.raises(LocalProtocolError) as info:
        a.send(Response(id=1, result=None))  # a said goodbye: nothing more
    assert info.value.code is ErrorCode.BAD_STATE


def test_after_a_goodbye_only_a_goodbye(pair):
    p = pair(ORCH)
    o = p.conn[ORCH]
    p.send(AGENT, Goodbye())
    with pytest.raises(LocalProtocolError):
        o.send(Request(id=1, method="status", params={}))
    q = pair(ORCH)
    q.send(AGENT, Goodbye())
    q.send(ORCH, Goodbye())
    assert q.conn[ORCH].state is ConnectionState.CLOSED


def test_frames_after_the_peers_goodbye_are_refused(pair):
    p = pair(ORCH)
    a = p.conn[AGENT]
    data = a.send(Goodbye()) + a._seal(Notification(payload={}))
    with pytest.raises(RemoteProtocolError) as info:
        p.conn[ORCH].receive_data(data)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert "after its Goodbye" in str(info.value)


def test_eof_and_transport_loss(pair):
    p = pair(ORCH)
    assert p.conn[ORCH].receive_data(b"") == [ConnectionClosed(clean=False, transport_lost=False)]
    assert p.conn[ORCH].state is ConnectionState.CLOSED
    assert p.conn[ORCH].receive_data(b"") == []
    with pytest.raises(LocalProtocolError) as info:
        p.conn[ORCH].receive_data(b"late")
    assert info.value.code is ErrorCode.CLOSED
    with pytest.raises(LocalProtocolError) as info:
        p.conn[ORCH].send(Ping())
    assert info.value.code is ErrorCode.CLOSED
    q = pair(ORCH)
    partial = q.conn[AGENT].send(Notification(payload={}))[:5]
    assert q.conn[ORCH].receive_data(partial) == []
    assert q.conn[ORCH].receive_data(None) == [ConnectionClosed(clean=False, transport_lost=True)]


def test_eof_inside_a_frame_is_a_truncation(pair):
    p = pair(ORCH)
    p.conn[ORCH].receive_data(p.conn[AGENT].send(Notification(payload={}))[:-1])
    with pytest.raises(RemoteProtocolError) as info:
        p.conn[ORCH].receive_data(b"")
    assert info.value.code is ErrorCode.TRUNCATED


def test_eof_during_the_handshake(key):
    a = Connection(AGENT, Config(key=key), name="agent")
    assert a.receive_data(b"") == [ConnectionClosed(clean=False, transport_lost=False)]


# --- roles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "event"),
    [
        (ORCH, Response(id=1, result=None)),
        (ORCH, Notification(payload={})),
        (AGENT, Request(id=1, method="status", params={})),
        (SENDER, Credit(stream=1, increment=1)),
        (RECEIVER, DataChunk(stream=1, seq=0, offset=0, raw_len=1, encoding=0, payload=b"x")),
        (ORCH, Pong()),
        (ORCH, ConnectionClosed(clean=True, transport_lost=False)),
    ],
)
def test_a_role_sends_only_its_messages(pair, role, event):
    first = ORCH if role in (ORCH, AGENT) else SENDER
    p = pair(first)
    with pytest.raises(LocalProtocolError) as info:
        p.conn[role].send(event)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_a_peer_sending_another_roles_message_is_refused(pair):
    p = pair(ORCH)
    forged = p.conn[ORCH]._seal(Response(id=1, result=None))
    with pytest.raises(RemoteProtocolError) as info:
        p.conn[AGENT].receive_data(forged)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert "an orchestrator may not send it" in str(info.value)


def test_data_roles_do_not_talk_to_control_roles(key):
    s = Connection(SENDER, Config(key=key), name="src")
    o = Connection(ORCH, Config(key=key), name="orch")
    with pytest.raises(RemoteProtocolError) as info:
        s.receive_data(o.data_to_send())
    assert info.value.code is ErrorCode.ROLE_MISMATCH
    assert "is not a data-receiver" in str(info.value)


def test_handshake_completed_is_delivered_once(pair):
    p = pair(SENDER)
    p.send(RECEIVER, Credit(stream=1, increment=1))
    assert not any(isinstance(e, HandshakeCompleted) for e in p.pump()[SENDER])


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"key": b"short"}, "at least 16"),
        ({"key": "a str key of enough length"}, "must be bytes"),
        ({"key": None, "compression_level": 23}, "compression_level"),
        ({"key": None, "features": frozenset({"teleport"})}, "unknown features"),
        ({"key": None, "max_chunk_size": 0}, "max_chunk_size"),
        ({"key": None, "max_streams": 0}, "max_streams must be positive"),
        ({"key": None, "max_handshake_frame_size": 100}, "a Hello must fit"),
        ({"key": None, "idle_timeout": float("inf")}, "idle_timeout"),
        ({"key": None, "keepalive_interval": 60.0}, "shorter than idle_timeout"),
    ],
)
def test_bad_config_is_a_local_error(kwargs, problem):
    with pytest.raises(LocalProtocolError) as info:
        Config(**kwargs)
    assert info.value.code is ErrorCode.BAD_CONFIG
    assert problem in str(info.value)


def test_bad_name_or_nonce(key):
    with pytest.raises(LocalProtocolError):
        Connection(ORCH, Config(key=key), name="")
    with pytest.raises(LocalProtocolError):
        Connection(ORCH, Config(key=key), name="x" * 129)
    with pytest.raises(LocalProtocolError):
        Connection(ORCH, Config(key=key), name="x", nonce=b"short")
