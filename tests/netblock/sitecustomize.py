"""Network access is blocked in the test suite: connections to anything but loopback raise, and so does
resolving a host name other than localhost or this machine's own (a DNS query is network access too).

conftest imports this in the pytest process; subprocesses that tests start get this folder first on
PYTHONPATH (conftest.subprocess_env), so Python imports it at start-up as `sitecustomize`.
"""

import ipaddress
import socket

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_getaddrinfo, _gethostbyname, _gethostbyname_ex = socket.getaddrinfo, socket.gethostbyname, socket.gethostbyname_ex


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


def _check_name(host):
    if host is None or isinstance(host, (bytes, bytearray)) and not host:
        return
    name = host.decode() if isinstance(host, (bytes, bytearray)) else str(host)
    try:
        ipaddress.ip_address(name.split("%")[0])
        return  # a numeric address: no lookup (connect checks where it points)
    except ValueError:
        pass
    lowered = name.lower().rstrip(".")
    if lowered in ("", "localhost", "localhost.localdomain", socket.gethostname().lower()) or \
            lowered.endswith(".localhost"):
        return
    raise NetworkBlocked(f"network access is blocked in tests: resolve {name!r}")


def _blocked_getaddrinfo(host, *args, **kwargs):
    _check_name(host)
    return _getaddrinfo(host, *args, **kwargs)


def _blocked_gethostbyname(host):
    _check_name(host)
    return _gethostbyname(host)


def _blocked_gethostbyname_ex(host):
    _check_name(host)
    return _gethostbyname_ex(host)


socket.getaddrinfo = _blocked_getaddrinfo
socket.gethostbyname = _blocked_gethostbyname
socket.gethostbyname_ex = _blocked_gethostbyname_ex
