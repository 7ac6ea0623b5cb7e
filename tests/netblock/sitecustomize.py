"""Network access is blocked in the test suite: connections to anything but loopback raise.

conftest imports this in the pytest process; subprocesses that tests start get this folder first on
PYTHONPATH (conftest.subprocess_env), so Python imports it at start-up as `sitecustomize`.
"""

import ipaddress
import socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


class NetworkBlocked(OSError):
    pass


def _check(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets
    host = address[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: resolving it would already use the network
        loopback = False
    if not loopback:
        raise NetworkBlocked(f"network access is blocked in tests: connect to {address!r}")


def _blocked_connect(self, address):
    _check(self, address)
    return _connect(self, address)


def _blocked_connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


socket.socket.connect = _blocked_connect
socket.socket.connect_ex = _blocked_connect_ex
