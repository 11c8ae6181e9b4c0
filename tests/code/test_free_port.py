"""`free_port` picks ports the kernel never hands out by itself, and only free ones."""

from __future__ import annotations

import socket

import pytest

from services import launch


def _ephemeral_low() -> int:
    return int(launch._PORT_RANGE.read_text().split()[0])


@pytest.mark.skipif(not launch._PORT_RANGE.exists(), reason="Linux's ephemeral port range")
def test_ports_come_from_below_the_ephemeral_range_and_can_be_bound():
    """Binding port 0 (as BentoML's process manager does for its control sockets) can never
    return a port `free_port` picked for a service."""
    low = _ephemeral_low()
    ports = {launch.free_port() for _ in range(20)}
    assert all(low - launch._SPAN <= p < low for p in ports)
    assert len(ports) > 10  # random picks, not one port over and over
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free: nothing took it


@pytest.mark.skipif(not launch._PORT_RANGE.exists(), reason="Linux's ephemeral port range")
def test_a_port_in_use_is_passed_over(monkeypatch):
    low = _ephemeral_low()
    with socket.socket() as taken:
        for candidate in range(low - launch._SPAN, low):  # a port of the range someone listens on
            try:
                taken.bind(("127.0.0.1", candidate))
                break
            except OSError:
                continue
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy, busy + 1 if busy + 1 < low else busy - 1])
        monkeypatch.setattr(launch._PICKS, "randrange", lambda a, b: next(picks))
        got = launch.free_port()
    assert got != busy
    assert low - launch._SPAN <= got < low
